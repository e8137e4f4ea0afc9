//! Figures from Linux's `/proc` memory reports.

/// The size on the `field` line (`VmHWM:  1234 kB`) of a `/proc` memory report such as
/// `/proc/self/status`, `/proc/self/smaps_rollup` or one line of `/proc/self/smaps`, in KiB.
pub fn kibibytes(report: &str, field: &str) -> Option<u64> {
    let line = report.lines().find(|line| line.starts_with(field))?;
    line[field.len()..]
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::kibibytes;

    #[test]
    fn sizes_are_read_from_the_named_line_of_a_proc_report() {
        let report = "Rss:             1141364 kB\nPss:              1139000 kB\n\
                      AnonHugePages:   1112064 kB\nVmHWM:\t  2048 kB\nName:\tdistillery\n";
        assert_eq!(kibibytes(report, "Rss:"), Some(1_141_364));
        assert_eq!(kibibytes(report, "AnonHugePages:"), Some(1_112_064));
        assert_eq!(kibibytes(report, "VmHWM:"), Some(2048));
        assert_eq!(kibibytes(report, "Name:"), None);
        assert_eq!(kibibytes(report, "Swap:"), None);
    }
}
