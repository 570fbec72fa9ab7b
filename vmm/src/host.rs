//! Facts about the host that decide what ferry can do or must warn about.

use std::path::Path;

/// Why this host's KVM cannot run guests at hardware speed, if it cannot.
pub fn kvm_without_hardware_virtualization() -> Option<&'static str> {
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Some("its KVM is KVM-over-PVM (module kvm_pvm)");
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let has_flag = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if has_flag {
        None
    } else {
        Some("its CPU shows no vmx or svm flag")
    }
}

/// Total RAM of the host in bytes, from /proc/meminfo.
pub fn host_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_host_memory() {
        assert!(super::host_memory().unwrap() > 64 << 20);
    }
}
