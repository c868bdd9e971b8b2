//! Reading a user's guest program: a static x86-64 ELF executable. Only
//! what running it needs is kept (the loadable segments and the entry
//! point); everything else in the file is checked, then ignored.
//!
//! The file is untrusted input: every field is bounds-checked and every
//! refusal is one line naming the file's problem (test
//! `guest_sdk::bad_files_fail_with_one_clear_line`).

/// One PT_LOAD segment: `data` goes at `vaddr`, the rest of `memsz` is zero.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub vaddr: u64,
    pub memsz: u64,
    pub data: Vec<u8>,
    pub executable: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElfProgram {
    pub entry: u64,
    pub segments: Vec<Segment>,
}

const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const PF_X: u32 = 1;
/// Segments a program may have (a linker makes a handful).
const MAX_SEGMENTS: usize = 64;

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// Parse and check `file` (the whole ELF image). Errors are one sentence
/// without the file name (the caller adds it).
pub fn parse(file: &[u8]) -> Result<ElfProgram, String> {
    if file.len() < 4 || &file[..4] != b"\x7fELF" {
        return Err("not an ELF file".into());
    }
    if file.len() < EHDR_SIZE {
        return Err("truncated ELF header".into());
    }
    match file[4] {
        2 => {}
        1 => return Err("a 32-bit ELF; guest programs are 64-bit x86-64".into()),
        c => return Err(format!("unknown ELF class {c}")),
    }
    match file[5] {
        1 => {}
        2 => return Err("a big-endian ELF; guest programs are little-endian x86-64".into()),
        d => return Err(format!("unknown ELF data encoding {d}")),
    }
    let machine = u16_at(file, 18);
    if machine != EM_X86_64 {
        return Err(format!("built for ELF machine {machine}, not x86-64 (62)"));
    }
    match u16_at(file, 16) {
        ET_EXEC => {}
        ET_DYN => {
            return Err(
                "a position-independent or shared object (ET_DYN); link a static executable with -static -no-pie"
                    .into(),
            )
        }
        t => return Err(format!("not an executable (ELF type {t})")),
    }
    let entry = u64_at(file, 24);
    let phoff = u64_at(file, 32);
    let phentsize = u16_at(file, 54) as usize;
    let phnum = u16_at(file, 56) as usize;
    if phnum == 0 {
        return Err("no program headers (nothing to load)".into());
    }
    if phentsize != PHDR_SIZE || phnum > MAX_SEGMENTS {
        return Err(format!(
            "unusual program headers ({phnum} of {phentsize} bytes)"
        ));
    }
    let table_end = usize::try_from(phoff)
        .ok()
        .and_then(|o| o.checked_add(phnum * PHDR_SIZE))
        .filter(|end| *end <= file.len())
        .ok_or("program headers lie past the end of the file")?;
    let table = &file[table_end - phnum * PHDR_SIZE..table_end];
    let mut segments = Vec::new();
    for ph in table.chunks_exact(PHDR_SIZE) {
        let kind = u32_at(ph, 0);
        if kind == PT_INTERP || kind == PT_DYNAMIC {
            return Err("a dynamically linked executable; link it with -static -nostdlib".into());
        }
        if kind != PT_LOAD {
            continue;
        }
        let flags = u32_at(ph, 4);
        let (offset, vaddr, filesz, memsz) = (
            u64_at(ph, 8),
            u64_at(ph, 16),
            u64_at(ph, 32),
            u64_at(ph, 40),
        );
        if memsz == 0 {
            continue;
        }
        if filesz > memsz {
            return Err(format!(
                "segment at {vaddr:#x} has more file bytes ({filesz}) than memory ({memsz})"
            ));
        }
        if vaddr.checked_add(memsz).is_none() {
            return Err(format!("segment at {vaddr:#x} wraps the address space"));
        }
        let data = usize::try_from(offset)
            .ok()
            .zip(usize::try_from(filesz).ok())
            .and_then(|(o, n)| file.get(o..o.checked_add(n)?))
            .ok_or_else(|| format!("segment at {vaddr:#x} lies past the end of the file"))?;
        segments.push(Segment {
            vaddr,
            memsz,
            data: data.to_vec(),
            executable: flags & PF_X != 0,
        });
    }
    if segments.is_empty() {
        return Err("no loadable (PT_LOAD) segments".into());
    }
    segments.sort_by_key(|s| s.vaddr);
    for w in segments.windows(2) {
        if w[0].vaddr + w[0].memsz > w[1].vaddr {
            return Err(format!(
                "segments at {:#x} and {:#x} overlap",
                w[0].vaddr, w[1].vaddr
            ));
        }
    }
    if !segments
        .iter()
        .any(|s| s.executable && (s.vaddr..s.vaddr + s.memsz).contains(&entry))
    {
        return Err(format!(
            "entry point {entry:#x} is outside every executable segment"
        ));
    }
    Ok(ElfProgram { entry, segments })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal valid image: one executable segment at 4 MiB holding `ret`.
    pub(crate) fn tiny() -> Vec<u8> {
        let mut f = vec![0u8; 0x1000 + 16];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[6] = 1;
        f[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        f[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        f[24..32].copy_from_slice(&0x40_0000u64.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes());
        f[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        f[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = 64;
        f[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        f[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes());
        f[ph + 8..ph + 16].copy_from_slice(&0x1000u64.to_le_bytes());
        f[ph + 16..ph + 24].copy_from_slice(&0x40_0000u64.to_le_bytes());
        f[ph + 32..ph + 40].copy_from_slice(&16u64.to_le_bytes());
        f[ph + 40..ph + 48].copy_from_slice(&0x2000u64.to_le_bytes());
        f[0x1000] = 0xc3;
        f
    }

    #[test]
    fn a_static_executable_parses() {
        let p = parse(&tiny()).unwrap();
        assert_eq!(p.entry, 0x40_0000);
        assert_eq!(p.segments.len(), 1);
        assert_eq!(p.segments[0].memsz, 0x2000);
        assert_eq!(p.segments[0].data.len(), 16);
    }

    #[test]
    fn every_malformed_header_is_refused_with_its_reason() {
        let bad = |edit: &dyn Fn(&mut Vec<u8>), why: &str| {
            let mut f = tiny();
            edit(&mut f);
            let e = parse(&f).unwrap_err();
            assert!(e.contains(why), "{why}: {e}");
        };
        bad(&|f| f[0] = b'M', "not an ELF");
        bad(&|f| f.truncate(20), "truncated");
        bad(&|f| f[4] = 1, "32-bit");
        bad(&|f| f[5] = 2, "big-endian");
        bad(&|f| f[18] = 3, "not x86-64");
        bad(&|f| f[16] = 3, "ET_DYN");
        bad(&|f| f[16] = 1, "not an executable");
        bad(&|f| f[64] = 3, "dynamically linked");
        bad(&|f| f[64] = 4, "no loadable");
        bad(&|f| f[39] = 0x10, "past the end");
        bad(&|f| f[64 + 9] = 0x40, "past the end of the file");
        bad(&|f| f[64 + 33] = 0x40, "more file bytes");
        bad(&|f| f[26] = 0x50, "outside every executable segment");
        bad(&|f| f[64 + 4] = 4, "outside every executable segment");
        bad(
            &|f| {
                f[64 + 23] = 0xff;
                f[64 + 47] = 0xff;
            },
            "wraps",
        );
    }
}
