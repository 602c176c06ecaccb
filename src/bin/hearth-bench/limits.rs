//! The "Pi-like" profile (`--pi`, or `--cpus N` / `--memory-mb M`): a Hearth joiner pinned to the first N cores
//! (`sched_setaffinity` in the child before it runs Hearth) and under a memory cap in a cgroup of its own, made
//! under the benchmark's own cgroup (so the child stays inside whatever already accounts for the benchmark).
//! cgroup v2 (`memory.max`) where this process's cgroup2 has the memory controller enabled for its children, else
//! cgroup v1 (`memory.limit_in_bytes`). The child puts itself into the group between fork and exec, so all of
//! Hearth's memory is charged; the group is removed once the child has exited. When no cap can be set, the run
//! says so (`cgroup` in the result) and goes on uncapped.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Clone, Copy, Debug, Default)]
pub struct Limits {
    pub cpus: Option<usize>,
    pub memory_mb: Option<u64>,
}

impl Limits {
    pub fn any(&self) -> bool {
        self.cpus.is_some() || self.memory_mb.is_some()
    }
}

/// What the cap did, for the result file.
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, Default)]
pub struct CapReport {
    pub cpus: Option<usize>,
    pub memory_limit_mb: Option<u64>,
    /// "v1 PATH", "v2 PATH", or "none: why".
    pub cgroup: String,
    /// The group's peak memory (v1 `memory.max_usage_in_bytes`, v2 `memory.peak`): RSS plus the page cache the
    /// process's file reads and writes brought in.
    pub cgroup_peak_mb: Option<f64>,
    /// Times the group hit its limit and had to reclaim (v1 `memory.failcnt`, v2 `memory.events` `max`).
    pub limit_hits: Option<u64>,
    /// OOM kills in the group (`memory.oom_control` / `memory.events` `oom_kill`).
    pub oom_kills: Option<u64>,
    /// How the child ended, if it ended before the benchmark stopped it.
    pub exit: Option<String>,
}

#[derive(Clone, Copy, PartialEq)]
enum Version {
    V1,
    V2,
}

/// A joiner's cgroup, removed on drop (after the child is gone).
pub struct Cgroup {
    dir: PathBuf,
    version: Version,
}

fn own_cgroup(controller: Option<&str>) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        match controller {
            None if ctrls.is_empty() => Some(path.to_owned()),
            Some(c) if ctrls.split(',').any(|x| x == c) => Some(path.to_owned()),
            _ => None,
        }
    })
}

fn v2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
    })
}

fn v1_memory_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&"cgroup") && f.get(3).is_some_and(|o| o.split(',').any(|x| x == "memory")))
            .then(|| PathBuf::from(f[1]))
    })
}

fn join(root: &Path, rel: &str) -> PathBuf {
    root.join(rel.trim_start_matches('/'))
}

impl Cgroup {
    /// A new group named `name` under this process's own, capped at `mb`; or why none could be made.
    pub fn create(name: &str, mb: u64) -> Result<Cgroup, String> {
        let bytes = mb * 1024 * 1024;
        let mut why = Vec::new();
        // v2: the memory controller must be enabled in our group's subtree_control for a child group to get it.
        match (v2_root(), own_cgroup(None)) {
            (Some(root), Some(rel)) => {
                let parent = join(&root, &rel);
                let enabled = std::fs::read_to_string(parent.join("cgroup.subtree_control")).unwrap_or_default();
                if enabled.split_whitespace().any(|c| c == "memory") {
                    let dir = parent.join(name);
                    match std::fs::create_dir(&dir)
                        .and_then(|_| std::fs::write(dir.join("memory.max"), bytes.to_string()))
                    {
                        Ok(()) => {
                            let _ = std::fs::write(dir.join("memory.swap.max"), "0");
                            return Ok(Cgroup { dir, version: Version::V2 });
                        }
                        Err(e) => {
                            let _ = std::fs::remove_dir(&dir);
                            why.push(format!("v2 {}: {e}", parent.display()));
                        }
                    }
                } else {
                    why.push(format!("v2: memory controller not enabled in {}", parent.display()));
                }
            }
            _ => why.push("v2: not mounted".into()),
        }
        match (v1_memory_root(), own_cgroup(Some("memory"))) {
            (Some(root), Some(rel)) => {
                let parent = join(&root, &rel);
                let dir = parent.join(name);
                let made = std::fs::create_dir(&dir)
                    .and_then(|_| std::fs::write(dir.join("memory.limit_in_bytes"), bytes.to_string()));
                match made {
                    Ok(()) => {
                        // No swap either (memsw exists only with swap accounting; it must be >= the limit).
                        let _ = std::fs::write(dir.join("memory.memsw.limit_in_bytes"), bytes.to_string());
                        return Ok(Cgroup { dir, version: Version::V1 });
                    }
                    Err(e) => {
                        let _ = std::fs::remove_dir(&dir);
                        why.push(format!("v1 {}: {e}", parent.display()));
                    }
                }
            }
            _ => why.push("v1: no memory hierarchy".into()),
        }
        Err(why.join("; "))
    }

    pub fn describe(&self) -> String {
        format!("{} {}", if self.version == Version::V1 { "v1" } else { "v2" }, self.dir.display())
    }

    fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    fn read_u64(&self, file: &str) -> Option<u64> {
        std::fs::read_to_string(self.dir.join(file)).ok()?.trim().parse().ok()
    }

    fn keyed(&self, file: &str, key: &str) -> Option<u64> {
        let text = std::fs::read_to_string(self.dir.join(file)).ok()?;
        text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// Peak MB, limit hits and OOM kills so far.
    pub fn usage(&self) -> (Option<f64>, Option<u64>, Option<u64>) {
        let mb = |b: u64| b as f64 / 1024.0 / 1024.0;
        match self.version {
            Version::V1 => (
                self.read_u64("memory.max_usage_in_bytes").map(mb),
                self.read_u64("memory.failcnt"),
                self.keyed("memory.oom_control", "oom_kill"),
            ),
            Version::V2 => (
                self.read_u64("memory.peak").map(mb),
                self.keyed("memory.events", "max"),
                self.keyed("memory.events", "oom_kill"),
            ),
        }
    }

    /// Whether `pid` is in this group now.
    pub fn holds(&self, pid: u32) -> bool {
        std::fs::read_to_string(self.procs()).map(|t| t.lines().any(|l| l.trim() == pid.to_string())).unwrap_or(false)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // The child has exited by now; a group whose last process just died may take a moment to empty.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        eprintln!("   could not remove the cgroup {}", self.dir.display());
    }
}

/// Set up `cmd` so that the child, between fork and exec, pins itself to the first `cpus` cores and moves itself
/// into `group` (its own pid, written by itself: never the benchmark's). Only async-signal-safe calls in the child.
pub fn apply(cmd: &mut Command, cpus: Option<usize>, group: Option<&Cgroup>) {
    let procs = group.map(|g| std::ffi::CString::new(g.procs().into_os_string().into_encoded_bytes()).expect("path"));
    // SAFETY: the closure runs in the forked child before exec and only calls getpid, open, write, close and
    // sched_setaffinity on memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(path) = &procs {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let mut digits = [0u8; 20];
                let mut n = libc::getpid() as u64;
                let mut i = digits.len();
                loop {
                    i -= 1;
                    digits[i] = b'0' + (n % 10) as u8;
                    n /= 10;
                    if n == 0 {
                        break;
                    }
                }
                let w = libc::write(fd, digits[i..].as_ptr().cast(), digits.len() - i);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if w < 0 {
                    return Err(err);
                }
            }
            if let Some(n) = cpus {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_ZERO(&mut set);
                for c in 0..n {
                    libc::CPU_SET(c, &mut set);
                }
                if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// The cores `pid` may run on (its `Cpus_allowed_list`), to check the pinning took.
pub fn cpus_allowed(pid: u32) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:").map(|v| v.trim().to_owned()))
}
