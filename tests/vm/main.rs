//! Tests that need root and real SocketCAN (vcan, the kernel's J1939
//! stack) or a tmpfs of their own. They are `#[ignore]`d: the VM lane
//! (`tests/vcan/run.sh`) runs them inside its VM with `--ignored`, one
//! file's tests per step (`vcan_socketcan::`, `vcan_j1939::`,
//! `fault_disk::`).

mod fault_disk;
mod vcan_j1939;
mod vcan_socketcan;
