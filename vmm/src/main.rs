use std::time::Duration;
use vmm::payload::Guest;
use vmm::{GuestConfig, Vm, VmConfig};

fn main() {
    let guest: Guest = std::env::args()
        .nth(1)
        .unwrap_or("touch".into())
        .parse()
        .unwrap();
    let memory: u64 = std::env::args()
        .nth(2)
        .map(|s| s.parse::<u64>().unwrap() << 20)
        .unwrap_or(256 << 20);
    let cfg = VmConfig {
        guest: GuestConfig::Builtin(guest),
        memory,
        ..VmConfig::default()
    };
    let mut vm = Vm::new(cfg).unwrap_or_else(|e| {
        eprintln!("odpvm: {e}");
        std::process::exit(1)
    });
    vm.start().unwrap();
    let r = vm.wait(Some(Duration::from_secs(5)));
    println!("{}", serde_json::to_string_pretty(&r).unwrap());
}
