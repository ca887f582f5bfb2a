//! The daemon, the CLI and the simulators end to end, in this process and
//! in child processes, with no service from outside the crate. One test
//! binary instead of one per file: each used to link the whole crate.
//! The cross lane runs this binary under qemu-user.
//!
//! Run one file's tests with its module path as the filter, for example
//! `cargo test --test system attack_firewall::`.
#![cfg(feature = "sim")]

#[path = "../fault_support/mod.rs"]
mod fault_support;

mod attack_firewall;
mod attack_flood;
mod attack_session;
mod auth_session;
mod bench_startup;
mod bus_full;
mod cli_matrix;
mod control_socket;
mod fault_can;
mod fault_gateway;
mod fault_store;
mod interop;
mod interop_gateway;
mod outbox_kill;
mod readme_walkthrough;
mod sim_session;
mod yocto_layer;
