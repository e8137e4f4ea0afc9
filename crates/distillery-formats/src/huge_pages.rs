//! Where a loaded model's weights lie in memory: 2 MiB pages rather than 4 KiB ones.
//!
//! A decoding step streams every weight from memory once. In 4 KiB pages that costs a TLB miss
//! every 4 KiB, and on a virtual machine each miss walks two levels of page tables; in 2 MiB
//! pages the misses all but vanish (SmolLM2-135M decoded up to 18% faster on a 2-core AVX2
//! EPYC VM, `experiments/inference/RESULTS.md`). Linux's usual setting ("madvise") backs memory
//! with 2 MiB pages only where a program asks. glibc's own request
//! (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`) proved unreliable: on a Zen 5 EPYC, SmolLM2's
//! weights lay in 4 KiB pages in some runs of one binary with the tunable set, for a reason not
//! found in glibc 2.36. So once a model is loaded, the anonymous memory that holds it is
//! advised for 2 MiB pages and collapsed into them (Linux 6.1 or later; older kernels collapse
//! it in the background).

use distillery_run::proc_report::kibibytes;

/// The environment variable that, set to `0`, keeps the weights in 4 KiB pages.
pub const HUGE_PAGES_VARIABLE: &str = "DISTILLERY_HUGE_PAGES";

const HUGE_PAGE: u64 = 2 << 20;

/// One mapping of a `/proc/PID/smaps` report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// Private, writable and backed by no file: where the heap, and so the weights, lie.
    pub anonymous_writable: bool,
    pub resident_bytes: u64,
    pub huge_page_bytes: u64,
    /// Whether the mapping asked for 2 MiB pages (`hg` among its `VmFlags`).
    pub advised: bool,
}

/// Resident bytes of the `mappings` that asked for 2 MiB pages: what a process controls; the
/// kernel grants the pages only where it finds free 2 MiB blocks.
pub fn advised_resident_bytes<'a>(mappings: impl IntoIterator<Item = &'a Mapping>) -> u64 {
    mappings
        .into_iter()
        .filter(|mapping| mapping.advised)
        .map(|mapping| mapping.resident_bytes)
        .sum()
}

/// The mappings of an smaps report; each one's fields come after its address line and before
/// its `VmFlags` line, which ends it.
pub fn mappings(smaps: &str) -> Vec<Mapping> {
    let mut mappings = Vec::new();
    let mut current: Option<Mapping> = None;
    for line in smaps.lines() {
        if let Some(mapping) = address_line(line) {
            current = Some(mapping);
        } else if let Some(mapping) = current.as_mut() {
            if let Some(size) = kibibytes(line, "Rss:") {
                mapping.resident_bytes = size * 1024;
            } else if let Some(size) = kibibytes(line, "AnonHugePages:") {
                mapping.huge_page_bytes = size * 1024;
            } else if let Some(flags) = line.strip_prefix("VmFlags:") {
                mapping.advised = flags.split_whitespace().any(|flag| flag == "hg");
                mappings.extend(current.take());
            }
        }
    }
    mappings
}

/// `55d0c0000000-55d0c8000000 rw-p 00000000 00:00 0   [heap]`: range, permissions, offset,
/// device, inode and an optional name.
fn address_line(line: &str) -> Option<Mapping> {
    let mut fields = line.split_whitespace();
    let (start, end) = fields.next()?.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let permissions = fields.next()?;
    let _offset = fields.next()?;
    let _device = fields.next()?;
    let inode = fields.next()?;
    let name = fields.next().unwrap_or("");
    Some(Mapping {
        start,
        end,
        anonymous_writable: permissions == "rw-p"
            && inode == "0"
            && (name.is_empty() || name == "[heap]"),
        resident_bytes: 0,
        huge_page_bytes: 0,
        advised: false,
    })
}

/// The whole 2 MiB pages inside the anonymous writable mappings that hold at least one page's
/// worth of resident memory (heaps, not the mostly untouched stacks of threads), as
/// `(start, length)`.
fn regions_to_collapse(mappings: &[Mapping]) -> Vec<(u64, u64)> {
    mappings
        .iter()
        .filter(|mapping| mapping.anonymous_writable && mapping.resident_bytes >= HUGE_PAGE)
        .filter_map(|mapping| {
            let start = mapping.start.next_multiple_of(HUGE_PAGE);
            let end = mapping.end / HUGE_PAGE * HUGE_PAGE;
            (end > start).then_some((start, end - start))
        })
        .collect()
}

/// Settles the heap once a model is loaded: the memory the loader freed (a GGUF file's bytes,
/// conversion buffers) goes back to the kernel, and the rest, the weights, moves into 2 MiB
/// pages unless [`HUGE_PAGES_VARIABLE`] is `0`. The kernel may decline to collapse a page (no
/// free 2 MiB block, THP turned off); the weights then stay where they are, so every error is
/// ignored.
pub fn settle_heap_after_loading() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only hands free heap memory back to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
    #[cfg(target_os = "linux")]
    {
        if std::env::var(HUGE_PAGES_VARIABLE).is_ok_and(|value| value == "0") {
            return;
        }
        let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
            return;
        };
        for (start, length) in regions_to_collapse(&mappings(&smaps)) {
            back_with_huge_pages(start, length, libc::MADV_HUGEPAGE);
            // One 2 MiB page at a time: over a whole range the kernel stops at the first page it
            // cannot collapse (EINVAL), leaving every page after it in 4 KiB pages.
            for page in (start..start + length).step_by(HUGE_PAGE as usize) {
                back_with_huge_pages(page, HUGE_PAGE, MADV_COLLAPSE);
            }
        }
    }
}

/// Gives the kernel `advice` (`MADV_HUGEPAGE` or `MADV_COLLAPSE`) about `length` bytes from
/// `start`; a refusal leaves the memory as it was.
#[cfg(target_os = "linux")]
fn back_with_huge_pages(start: u64, length: u64, advice: libc::c_int) {
    // SAFETY: these two advices change only how the kernel backs memory, never its contents;
    // on a range that is not mapped, madvise fails and changes nothing.
    unsafe {
        libc::madvise(start as usize as *mut libc::c_void, length as usize, advice);
    }
}

/// Linux's synchronous collapse into 2 MiB pages (6.1 and later); the libc crate names it only
/// for glibc targets.
#[cfg(target_os = "linux")]
const MADV_COLLAPSE: libc::c_int = 25;

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0100000-55d0c8000000 rw-p 00000000 00:00 0                          [heap]
Size:             130048 kB
Rss:              120000 kB
AnonHugePages:     40960 kB
VmFlags: rd wr mr mw me ac hg
7f0000000000-7f0000800000 r-xp 00000000 08:01 42                         /usr/bin/x
Rss:                 900 kB
VmFlags: rd ex mr mw me
7f0000800000-7f0001000000 rw-p 00000000 00:00 0
Rss:                  12 kB
VmFlags: rd wr mr mw me ac
7f0002000000-7f0002200000 rw-p 00000000 00:00 0
Rss:                2048 kB
VmFlags: rd wr mr mw me ac sd hgx
";

    #[test]
    fn smaps_mappings_carry_their_range_residence_and_advice() {
        let parsed = mappings(SMAPS);
        assert_eq!(parsed.len(), 4);
        assert_eq!(
            parsed[0],
            Mapping {
                start: 0x55d0c0100000,
                end: 0x55d0c8000000,
                anonymous_writable: true,
                resident_bytes: 120_000 * 1024,
                huge_page_bytes: 40_960 * 1024,
                advised: true,
            }
        );
        assert!(!parsed[1].anonymous_writable);
        assert_eq!(parsed[1].resident_bytes, 900 * 1024);
        assert!(parsed[2].anonymous_writable && !parsed[2].advised);
        // `hgx` is not `hg`.
        assert!(!parsed[3].advised);
    }

    #[test]
    fn a_loaded_models_memory_asks_for_huge_pages() {
        // Without transparent huge pages in the kernel, madvise refuses the advice.
        if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage/enabled").exists() {
            return;
        }
        // 40 MiB lies above glibc's largest mmap threshold (32 MiB), so it is a mapping of
        // its own, as a model's large tensors are; every page is touched, so it is resident.
        let weights = vec![1u8; 40 << 20];
        settle_heap_after_loading();
        let start = weights.as_ptr() as u64;
        let end = start + weights.len() as u64;
        // The advice splits the mapping where its whole 2 MiB pages begin and end.
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let holding: Vec<Mapping> = mappings(&smaps)
            .into_iter()
            .filter(|mapping| mapping.start < end && start < mapping.end)
            .collect();
        assert!(
            holding.iter().all(|mapping| mapping.anonymous_writable),
            "{holding:?}"
        );
        // All but the partial 2 MiB pages at either end.
        assert!(advised_resident_bytes(&holding) >= 36 << 20, "{holding:?}");
        // Moving the pages never changes what they hold.
        assert!(weights.iter().all(|&byte| byte == 1));
    }

    #[test]
    fn only_the_whole_huge_pages_of_resident_heaps_are_collapsed() {
        // The heap starts 1 MiB past a 2 MiB boundary, so its first whole page starts at the
        // next one; the thread stack holds 12 KiB and is left alone; the last mapping is
        // exactly one page.
        assert_eq!(
            regions_to_collapse(&mappings(SMAPS)),
            vec![
                (0x55d0c0200000, 0x55d0c8000000 - 0x55d0c0200000),
                (0x7f0002000000, 2 << 20),
            ]
        );
    }
}
