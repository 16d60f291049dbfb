//! Host metrics: CPU, load, memory, the data directory's filesystem and network totals.
//!
//! Only what is reported gets refreshed (no process table, no full disk rescan), so that a sample
//! costs a few small reads of `/proc` and `/sys` and one `statvfs`.

use std::path::{Path, PathBuf};

use sysinfo::{CpuRefreshKind, Disk, DiskRefreshKind, Disks, MemoryRefreshKind, Networks, RefreshKind, System};

/// One reading of the host.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostMetrics {
    /// Whole host, 0..=100, since the previous sample.
    pub cpu_percent: f64,
    pub load1: f64,
    pub load5: f64,
    pub load15: f64,
    /// Total minus available memory (page cache that can be reclaimed is not counted as used).
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    /// The filesystem holding the data directory; used is total minus what is available to
    /// unprivileged users, so blocks reserved for root count as used.
    pub disk_used_bytes: u64,
    pub disk_total_bytes: u64,
    /// Cumulative totals over every interface except loopback. They are kernel counters, so they
    /// drop when an interface (a container's veth, say) goes away: treat a decrease as a reset.
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
}

/// What the host can offer to workloads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capacity {
    /// Logical CPUs × 1000.
    pub cpu_millis: u64,
    pub memory_bytes: u64,
}

/// Keeps the state sysinfo needs between samples (CPU usage is a difference of two readings).
pub struct HostSampler {
    system: System,
    networks: Networks,
    data_dir: PathBuf,
    /// The filesystem holding `data_dir`, found once; looked up again while it is unknown.
    data_disk: Option<Disk>,
}

impl HostSampler {
    /// Takes a first CPU reading, so the first [`sample`](Self::sample) reports CPU use since now.
    ///
    /// # Panics
    ///
    /// On a platform sysinfo does not support (the agent runs on Linux only).
    pub fn new(data_dir: &Path) -> HostSampler {
        let system = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing().with_usage())
                .with_memory(MemoryRefreshKind::nothing().with_ram()),
        )
        .expect("sysinfo supports this platform");
        let networks = Networks::new_with_refreshed_list().expect("sysinfo supports this platform");
        let data_dir = data_dir.to_path_buf();
        let data_disk = find_disk(&data_dir);
        HostSampler { system, networks, data_dir, data_disk }
    }

    /// Reads the host now. CPU use is measured since the previous call (or since [`new`](Self::new));
    /// calls closer together than [`sysinfo::MINIMUM_CPU_UPDATE_INTERVAL`] give a rough value.
    pub fn sample(&mut self) -> HostMetrics {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        // `true` drops interfaces that went away and picks up new ones (containers come and go).
        self.networks.refresh(true);
        match &mut self.data_disk {
            Some(disk) => {
                disk.refresh_specifics(DiskRefreshKind::nothing().with_storage());
            }
            None => self.data_disk = find_disk(&self.data_dir),
        }

        let load = System::load_average().unwrap_or_default();
        let cpu_percent = f64::from(self.system.global_cpu_usage());
        let (disk_used_bytes, disk_total_bytes) = self
            .data_disk
            .as_ref()
            .map_or((0, 0), |disk| (disk.total_space().saturating_sub(disk.available_space()), disk.total_space()));
        let (net_rx_bytes, net_tx_bytes) = self.networks.iter().filter(|(name, _)| name.as_os_str() != "lo").fold(
            (0u64, 0u64),
            |(rx, tx), (_, data)| {
                (rx.saturating_add(data.total_received()), tx.saturating_add(data.total_transmitted()))
            },
        );

        HostMetrics {
            cpu_percent: if cpu_percent.is_finite() { cpu_percent.clamp(0.0, 100.0) } else { 0.0 },
            load1: load.one,
            load5: load.five,
            load15: load.fifteen,
            memory_used_bytes: self.system.used_memory(),
            memory_total_bytes: self.system.total_memory(),
            disk_used_bytes,
            disk_total_bytes,
            net_rx_bytes,
            net_tx_bytes,
        }
    }

    pub fn capacity(&self) -> Capacity {
        Capacity { cpu_millis: self.system.cpus().len() as u64 * 1000, memory_bytes: self.system.total_memory() }
    }
}

/// The mounted filesystem whose mount point is the longest prefix of the canonical `data_dir`.
/// A data directory that does not exist yet is resolved through its nearest existing ancestor.
/// sysinfo skips pseudo filesystems (tmpfs included), so such a directory maps to the disk below.
fn find_disk(data_dir: &Path) -> Option<Disk> {
    let absolute = std::path::absolute(data_dir).ok()?;
    let resolved = absolute.ancestors().find_map(|dir| {
        let canonical = dir.canonicalize().ok()?;
        Some(canonical.join(absolute.strip_prefix(dir).ok()?))
    })?;
    let disks = Disks::new_with_refreshed_list_specifics(DiskRefreshKind::nothing().with_storage()).ok()?;
    // Later entries in the mount table shadow earlier ones on the same mount point, hence `>=`.
    Vec::from(disks).into_iter().filter(|disk| resolved.starts_with(disk.mount_point())).fold(
        None,
        |best: Option<Disk>, disk| match best {
            Some(best) if best.mount_point().components().count() > disk.mount_point().components().count() => {
                Some(best)
            }
            _ => Some(disk),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_reports_this_host() {
        let data_dir = tempfile::tempdir().unwrap();
        let mut sampler = HostSampler::new(data_dir.path());
        let metrics = sampler.sample();
        assert!(metrics.memory_total_bytes > 0, "{metrics:?}");
        assert!(metrics.memory_used_bytes <= metrics.memory_total_bytes, "{metrics:?}");
        assert!(metrics.disk_total_bytes > 0, "{metrics:?}");
        assert!(metrics.disk_used_bytes <= metrics.disk_total_bytes, "{metrics:?}");
        assert!(metrics.load1 >= 0.0 && metrics.load5 >= 0.0 && metrics.load15 >= 0.0, "{metrics:?}");
    }

    #[test]
    fn cpu_percent_is_a_percentage_after_two_samples() {
        let data_dir = tempfile::tempdir().unwrap();
        let mut sampler = HostSampler::new(data_dir.path());
        sampler.sample();
        // CPU use is a difference of two readings: time has to pass between them.
        std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
        let metrics = sampler.sample();
        assert!((0.0..=100.0).contains(&metrics.cpu_percent), "{metrics:?}");
    }

    #[test]
    fn capacity_counts_every_cpu_and_all_memory() {
        let sampler = HostSampler::new(Path::new("/"));
        let capacity = sampler.capacity();
        assert!(capacity.cpu_millis >= 1000, "{capacity:?}");
        assert_eq!(capacity.cpu_millis % 1000, 0, "{capacity:?}");
        assert!(capacity.memory_bytes > 0, "{capacity:?}");
    }

    #[test]
    fn data_dir_that_does_not_exist_yet_uses_its_parent_filesystem() {
        let parent = tempfile::tempdir().unwrap();
        let mut sampler = HostSampler::new(&parent.path().join("not/yet/created"));
        let metrics = sampler.sample();
        assert!(metrics.disk_total_bytes > 0, "{metrics:?}");
    }
}
