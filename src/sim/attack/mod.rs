//! Attacker tools for the attack suite (`tests/attack_*.rs`,
//! `tests/vcan/steps/attack.sh`, `docs/security-tests.md`): a junk flood
//! for the inlet bus ([`flood`], `bmsgw sim flood`), and the in-process
//! world the suite attacks ([`rig`]). The demo's own attackers (forged
//! grants, a replayed AuthRequest) live in `sim::demo`.

pub mod flood;
pub mod rig;
