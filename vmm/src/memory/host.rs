//! Host memory helpers: the VMM's own buffers, huge-page accounting,
//! `/proc/self/pagemap` and `MADV_DONTNEED`.

use super::Backing;

/// A fresh private anonymous mapping of `len` bytes (populated up front
/// with `populate`), for the VMM's own buffers. The caller owns it.
pub fn map_anonymous(len: u64, populate: bool) -> Result<u64, String> {
    let extra = if populate {
        libc::MAP_POPULATE
    } else {
        libc::MAP_NORESERVE
    };
    // SAFETY: a new mapping at an address the kernel picks; nothing else
    // refers to it yet.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!(
            "mapping {len} bytes: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(p as u64)
}

/// 2 MiB huge pages free and not reserved by anyone (`/proc/meminfo`).
pub fn free_huge_pages() -> u64 {
    let m = meminfo();
    m("HugePages_Free:").saturating_sub(m("HugePages_Rsvd:"))
}

/// `/proc/meminfo`, read once: a field's value (kB or pages; 0 if absent).
fn meminfo() -> impl Fn(&str) -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    move |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

/// Whether the host is short of memory: under a quarter of it available.
/// Old guest pages are then given back at full speed rather than paced.
pub fn memory_is_short() -> bool {
    let m = meminfo();
    m("MemAvailable:") < m("MemTotal:") / 4
}

/// Make sure `n` 2 MiB huge pages are free, raising
/// `/proc/sys/vm/nr_hugepages` if needed (root). Err says why not.
pub fn reserve_huge_pages(n: u64) -> Result<(), String> {
    let free = || -> u64 {
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("HugePages_Free:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0)
    };
    let have = free();
    if have >= n {
        return Ok(());
    }
    let total: u64 = std::fs::read_to_string("/proc/sys/vm/nr_hugepages")
        .map_err(|e| format!("reading /proc/sys/vm/nr_hugepages: {e}"))?
        .trim()
        .parse()
        .unwrap_or(0);
    std::fs::write("/proc/sys/vm/nr_hugepages", format!("{}", total + n - have))
        .map_err(|e| format!("cannot reserve 2 MiB huge pages ({e})"))?;
    match free() {
        f if f >= n => Ok(()),
        f => Err(format!(
            "only {f} free 2 MiB huge pages after asking for {n}"
        )),
    }
}

/// `/proc/self/pagemap`: whether a virtual page maps the kernel's shared
/// zero page (needs CAP_SYS_ADMIN to see frame numbers; without it nothing
/// counts as zero).
pub(super) mod pagemap {
    use std::os::unix::fs::FileExt;
    use std::sync::OnceLock;

    struct Pagemap {
        file: std::fs::File,
        zero_pfn: u64,
    }

    const PFN_MASK: u64 = (1 << 55) - 1;
    const PRESENT: u64 = 1 << 63;

    fn entry(f: &std::fs::File, va: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, va / 4096 * 8).ok()?;
        let e = u64::from_le_bytes(b);
        (e & PRESENT != 0).then_some(e & PFN_MASK)
    }

    fn get() -> Option<&'static Pagemap> {
        static PM: OnceLock<Option<Pagemap>> = OnceLock::new();
        PM.get_or_init(|| {
            let file = std::fs::File::open("/proc/self/pagemap").ok()?;
            // A fresh private page, read once, maps the zero page.
            let probe = vec![0u8; 3 * 4096];
            let va = (probe.as_ptr() as u64).next_multiple_of(4096);
            // SAFETY: reading (not writing) a byte of an allocation we own;
            // the allocator may have touched it already, then it is not the
            // zero page and the probe fails below.
            let _ = unsafe { std::ptr::read_volatile(va as *const u8) };
            let zero_pfn = entry(&file, va).filter(|p| *p != 0)?;
            // Only trust it if an anonymous untouched page maps there too.
            // SAFETY: a fresh anonymous mapping, read once, then unmapped.
            let ok = unsafe {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                if p == libc::MAP_FAILED {
                    return None;
                }
                let _ = std::ptr::read_volatile(p as *const u8);
                let pfn = entry(&file, p as u64);
                libc::munmap(p, 4096);
                pfn
            };
            (ok == Some(zero_pfn)).then_some(Pagemap { file, zero_pfn })
        })
        .as_ref()
    }

    pub fn is_zero_page(va: u64) -> bool {
        get().is_some_and(|pm| entry(&pm.file, va) == Some(pm.zero_pfn))
    }
}

pub(super) fn madvise_dontneed(hva: u64, len: u64, backing: Backing) {
    // Shared memory keeps its pages in the file after DONTNEED; punching
    // them out is what makes them fresh (and gives the memory back).
    let advice = match backing {
        Backing::Anonymous => libc::MADV_DONTNEED,
        Backing::Memfd | Backing::Hugetlbfs => libc::MADV_REMOVE,
    };
    // SAFETY: the range lies in a mapping this module owns; discarding its
    // pages is the intent, and nothing in the VMM holds references into it
    // (devices only use translations the mmu has invalidated by now).
    let rc = unsafe { libc::madvise(hva as *mut libc::c_void, len as usize, advice) };
    if rc != 0 {
        log::warn!(
            "madvise({hva:#x}, {len:#x}): {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    /// `memory_is_short` compares two fields; both must be read.
    #[test]
    fn meminfo_fields_are_read() {
        let m = super::meminfo();
        assert!(m("MemTotal:") > 0);
        assert!(m("MemAvailable:") > 0);
        assert!(m("MemAvailable:") <= m("MemTotal:"));
    }
}
