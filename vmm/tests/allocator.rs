//! `contention::tune_allocator`: after it, a thread that allocates 40 MiB
//! in 4 KiB blocks (what the fault thread does for the mmu's fresh leaves
//! after a teardown) sees the heap grow a few times in big steps, not a
//! page at a time. Each growth takes the mmap lock for writing, and every
//! vCPU fault queues behind a waiting writer.
//!
//! Its own `main` (no test harness): the tuning must come before any other
//! thread allocates. Run untuned in a child process (`untuned` argument)
//! to show what it prevents.

/// The extent of the mapping holding `addr` (`/proc/self/maps`).
fn mapping_of(addr: usize) -> (usize, usize) {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter_map(|l| {
            let (range, _) = l.split_once(' ')?;
            let (a, b) = range.split_once('-')?;
            Some((
                usize::from_str_radix(a, 16).ok()?,
                usize::from_str_radix(b, 16).ok()?,
            ))
        })
        .find(|&(a, b)| a <= addr && addr < b)
        .unwrap()
}

/// How many times the mapping holding the newest block changed while a
/// fresh thread allocated 40 MiB of 4 KiB blocks.
fn growth_steps() -> usize {
    std::thread::spawn(|| {
        let mut blocks = Vec::with_capacity(10_240);
        let (mut seen, mut changes) = (None, 0);
        for i in 0..10_240 {
            blocks.push(vec![1u8; 4096]);
            if i % 16 == 0 {
                let now = mapping_of(blocks[i].as_ptr() as usize);
                if seen.is_some_and(|s| s != now) {
                    changes += 1;
                }
                seen = Some(now);
            }
        }
        changes
    })
    .join()
    .unwrap()
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("untuned") {
        println!("{}", growth_steps());
        return;
    }
    vmm::contention::tune_allocator();
    let tuned = growth_steps();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .arg("untuned")
        .output()
        .unwrap();
    let untuned: usize = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    println!("heap growth steps for 40 MiB of 4 KiB blocks: tuned {tuned}, untuned {untuned}");
    assert!(tuned <= 3, "tuned, the heap grew {tuned} times");
    assert!(
        untuned > 20,
        "untuned, the heap grew only {untuned} times: the probe sees nothing"
    );
    println!("test a_threads_heap_grows_in_big_steps ... ok");
}
