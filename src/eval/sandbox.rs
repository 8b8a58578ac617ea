//! Runs untrusted Python (model completions with their tests) in a child
//! process that cannot hurt the machine it runs on.
//!
//! Layers, all set up in the child between `fork` and `exec`:
//! - its own session and process group (`setsid`), killed as a whole with
//!   SIGKILL at the wall-clock timeout and again after it exits;
//! - rlimits: CPU seconds, address space, file size, open files, no core
//!   dumps (and processes, once root is dropped);
//! - seccomp: `fork`/`vfork`/`clone` of a new process fail with EPERM (threads
//!   still work), sockets other than AF_UNIX fail with EACCES, `io_uring`
//!   (which could bypass the socket filter) is unavailable;
//! - Landlock (Linux >= 5.13): the whole file system is read-only except the
//!   fresh temporary directory that is the program's cwd, HOME and TMPDIR;
//! - as root: a new network namespace (only a downed loopback) and the
//!   unprivileged uid/gid 65534 (`nobody`), so RLIMIT_NPROC, which root
//!   ignores, applies too. Dropping root needs an interpreter `nobody` can
//!   run: the first `python3` on PATH whose real path is world-executable
//!   (pyenv shims under /root are skipped), or `QCODER_SANDBOX_PYTHON`.
//!   Not root: no namespaces and the caller's uid; seccomp, Landlock and
//!   the rlimits still hold, so new processes, sockets and writes outside
//!   the directory are refused all the same.
//!
//! [`Isolation`] records which layers were active, for the report.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

/// `nobody`/`nogroup` on Debian-family systems.
const SANDBOX_ID: u32 = 65534;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("no python3 interpreter found on PATH (set QCODER_SANDBOX_PYTHON to one)")]
    NoPython,
    #[error("sandbox: {what}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SandboxError {
    let what = what.into();
    move |source| SandboxError::Io { what, source }
}

/// Resource limits for one program.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Limits {
    #[serde(serialize_with = "secs")]
    pub timeout: Duration,
    pub cpu_seconds: u64,
    pub address_space_bytes: u64,
    pub file_size_bytes: u64,
    pub open_files: u64,
    /// Tasks (processes and threads) of the sandbox uid; set only when root
    /// is dropped to uid 65534 (root ignores RLIMIT_NPROC, and for another
    /// user it would count all their processes).
    pub processes: u64,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            cpu_seconds: 10,
            address_space_bytes: 2 << 30,
            file_size_bytes: 16 << 20,
            open_files: 256,
            processes: 32,
        }
    }
}

/// Which isolation layers the sandbox uses on this machine.
#[derive(Debug, Clone, Serialize)]
pub struct Isolation {
    pub python: PathBuf,
    /// The uid the program runs as.
    pub uid: u32,
    pub network_namespace: bool,
    /// Landlock ABI version, when the kernel has Landlock.
    pub landlock_abi: Option<u32>,
    pub seccomp: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "verdict")]
pub enum Verdict {
    Passed,
    /// Exited non-zero or was killed by a signal (other than at the CPU limit).
    Failed {
        exit_code: Option<i32>,
        signal: Option<i32>,
    },
    /// Ran past the wall-clock timeout or was killed at its CPU-time limit.
    TimedOut,
}

#[derive(Debug, Clone, Serialize)]
pub struct Execution {
    #[serde(flatten)]
    pub verdict: Verdict,
    pub seconds: f64,
    /// The end of the program's stderr (the exception, usually).
    pub stderr_tail: String,
}

impl Execution {
    pub fn passed(&self) -> bool {
        self.verdict == Verdict::Passed
    }
}

pub struct Sandbox {
    limits: Limits,
    isolation: Isolation,
    drop_root: bool,
}

impl Sandbox {
    /// Finds the interpreter and probes which layers this machine supports.
    pub fn new(limits: Limits) -> Result<Self, SandboxError> {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let python = find_python(root)?;
        let drop_root = root && world_executable(&python);
        Ok(Self {
            limits,
            isolation: Isolation {
                python,
                uid: if drop_root {
                    SANDBOX_ID
                } else {
                    // SAFETY: as above.
                    unsafe { libc::geteuid() }
                },
                network_namespace: root,
                landlock_abi: landlock_abi(),
                seccomp: seccomp_filter().is_some(),
            },
            drop_root,
        })
    }

    pub fn isolation(&self) -> &Isolation {
        &self.isolation
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Runs `program` with `python -I -B` in a fresh temporary directory,
    /// removed afterwards; nothing it started is left running.
    pub fn run_python(&self, program: &str) -> Result<Execution, SandboxError> {
        let dir = tempfile::Builder::new()
            .prefix("qcoder-sandbox-")
            .tempdir()
            .map_err(io("creating a temporary directory"))?;
        let work = dir.path().join("work");
        std::fs::create_dir(&work).map_err(io(format!("creating {}", work.display())))?;
        let script = work.join("program.py");
        std::fs::write(&script, program).map_err(io(format!("writing {}", script.display())))?;
        // Output goes to files outside `work` (written through inherited
        // descriptors, capped by RLIMIT_FSIZE), so the program cannot fill a pipe.
        let stdout_path = dir.path().join("stdout");
        let stderr_path = dir.path().join("stderr");
        let stdout = File::create(&stdout_path).map_err(io("creating the stdout file"))?;
        let stderr = File::create(&stderr_path).map_err(io("creating the stderr file"))?;
        if self.drop_root {
            for p in [work.as_path(), script.as_path()] {
                std::os::unix::fs::chown(p, Some(SANDBOX_ID), Some(SANDBOX_ID))
                    .map_err(io(format!("chown {}", p.display())))?;
            }
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
                .map_err(io("chmod of the temporary directory"))?;
        }

        let setup = ChildSetup {
            limits: self.limits,
            network_namespace: self.isolation.network_namespace,
            landlock: self.isolation.landlock_abi.map(|abi| LandlockPlan {
                abi,
                root: c_path(Path::new("/")),
                writable: c_path(&work),
                dev_null: c_path(Path::new("/dev/null")),
            }),
            drop_to: self.drop_root.then_some(SANDBOX_ID),
            seccomp: seccomp_filter(),
        };
        let mut cmd = Command::new(&self.isolation.python);
        cmd.arg("-I")
            .arg("-B")
            .arg(&script)
            .current_dir(&work)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", &work)
            .env("TMPDIR", &work)
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        // SAFETY: the closure only makes async-signal-safe system calls on
        // data prepared before the fork; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || setup.apply());
        }
        let start = Instant::now();
        let child = cmd
            .spawn()
            .map_err(io(format!("starting {}", self.isolation.python.display())))?;
        let pid = child.id() as libc::pid_t;
        let timed_out = loop {
            if exited(pid).map_err(io("waiting for the program"))? {
                break false;
            }
            if start.elapsed() >= self.limits.timeout {
                break true;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        // The child leads its own process group: kill everything in it, on
        // timeout and after a normal exit alike. The child is not reaped yet,
        // so its pid (the group id) cannot have been reused.
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
        let (status, cpu) = reap(pid).map_err(io("waiting for the program"))?;
        // `child` is reaped now; dropping it neither waits nor kills.
        drop(child);
        let seconds = start.elapsed().as_secs_f64();
        // The kernel kills a program at its CPU limit (SIGKILL at the hard
        // limit, SIGXCPU at the soft one); for a busy loop that can come a
        // moment before the wall-clock check, and it is a timeout all the same.
        let hit_cpu_limit = matches!(status.signal(), Some(libc::SIGKILL | libc::SIGXCPU))
            && cpu + Duration::from_millis(100) >= Duration::from_secs(self.limits.cpu_seconds);
        let verdict = if timed_out || hit_cpu_limit {
            Verdict::TimedOut
        } else if status.success() {
            Verdict::Passed
        } else {
            Verdict::Failed {
                exit_code: status.code(),
                signal: status.signal(),
            }
        };
        Ok(Execution {
            verdict,
            seconds,
            stderr_tail: tail(&stderr_path, 800),
        })
    }
}

/// Whether the child has exited, without reaping it (WNOWAIT).
fn exited(pid: libc::pid_t) -> std::io::Result<bool> {
    // SAFETY: waitid writes a siginfo_t into valid, zeroed memory; si_pid
    // reads the field waitid sets for WEXITED.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        check(libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        ))?;
        Ok(info.si_pid() != 0)
    }
}

/// Reaps the child: its exit status and the CPU time (user + system) it used.
fn reap(pid: libc::pid_t) -> std::io::Result<(std::process::ExitStatus, Duration)> {
    let mut status: libc::c_int = 0;
    // SAFETY: wait4 writes an int and a rusage into valid, zeroed memory.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        loop {
            if libc::wait4(pid, &mut status, 0, &mut usage) >= 0 {
                break usage;
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Ok((
        std::process::ExitStatus::from_raw(status),
        tv(usage.ru_utime) + tv(usage.ru_stime),
    ))
}

/// The last `n` bytes of a file, lossily decoded.
fn tail(path: &Path, n: u64) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(n)));
        let _ = f.take(n).read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).trim().to_string()
}

fn c_path(p: &Path) -> CString {
    // Paths from the OS or from tempfile never contain NUL.
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

fn find_python(root: bool) -> Result<PathBuf, SandboxError> {
    if let Some(p) = std::env::var_os("QCODER_SANDBOX_PYTHON") {
        return Ok(PathBuf::from(p));
    }
    let candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join("python3"))
                .filter(|p| p.is_file())
                .filter_map(|p| p.canonicalize().ok())
                .collect()
        })
        .unwrap_or_default();
    if root {
        if let Some(p) = candidates.iter().find(|p| world_executable(p)) {
            return Ok(p.clone());
        }
    }
    candidates.into_iter().next().ok_or(SandboxError::NoPython)
}

/// Whether a user with no special rights can execute `path`: the file and
/// every directory above it are executable by others.
fn world_executable(path: &Path) -> bool {
    let Ok(real) = path.canonicalize() else {
        return false;
    };
    real.ancestors()
        .all(|p| std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
}

// ---- what the child does between fork and exec ------------------------------

struct LandlockPlan {
    abi: u32,
    root: CString,
    writable: CString,
    dev_null: CString,
}

struct ChildSetup {
    limits: Limits,
    network_namespace: bool,
    landlock: Option<LandlockPlan>,
    drop_to: Option<u32>,
    seccomp: Option<Vec<SockFilter>>,
}

fn check(ret: libc::c_int) -> std::io::Result<()> {
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl ChildSetup {
    /// Runs in the forked child: only async-signal-safe calls.
    fn apply(&self) -> std::io::Result<()> {
        // SAFETY: plain system calls on valid pointers to data owned by self.
        unsafe {
            check(libc::setsid())?;
            let l = &self.limits;
            for (resource, value) in [
                (libc::RLIMIT_CPU, l.cpu_seconds),
                (libc::RLIMIT_AS, l.address_space_bytes),
                (libc::RLIMIT_FSIZE, l.file_size_bytes),
                (libc::RLIMIT_NOFILE, l.open_files),
                (libc::RLIMIT_CORE, 0),
            ] {
                let lim = libc::rlimit {
                    rlim_cur: value as libc::rlim_t,
                    rlim_max: value as libc::rlim_t,
                };
                check(libc::setrlimit(resource, &lim))?;
            }
            if self.network_namespace {
                check(libc::unshare(libc::CLONE_NEWNET))?;
            }
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
            if let Some(plan) = &self.landlock {
                landlock_restrict(plan)?;
            }
            if let Some(id) = self.drop_to {
                // Per uid: for any other user than the dedicated one it would
                // count their unrelated processes too (seccomp stops forks anyway).
                let lim = libc::rlimit {
                    rlim_cur: l.processes as libc::rlim_t,
                    rlim_max: l.processes as libc::rlim_t,
                };
                check(libc::setrlimit(libc::RLIMIT_NPROC, &lim))?;
                check(libc::setgroups(0, std::ptr::null()))?;
                check(libc::setgid(id))?;
                check(libc::setuid(id))?;
            }
            if let Some(filter) = &self.seccomp {
                let prog = SockFprog {
                    len: filter.len() as u16,
                    filter: filter.as_ptr(),
                };
                check(libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                    &prog as *const SockFprog as libc::c_ulong,
                ))?;
            }
        }
        Ok(())
    }
}

// ---- Landlock (include/uapi/linux/landlock.h) -------------------------------

const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
const LANDLOCK_RULE_PATH_BENEATH: libc::c_int = 1;
const FS_EXECUTE: u64 = 1 << 0;
const FS_WRITE_FILE: u64 = 1 << 1;
const FS_READ_FILE: u64 = 1 << 2;
const FS_READ_DIR: u64 = 1 << 3;
/// EXECUTE … MAKE_SYM: the 13 rights of ABI 1.
const FS_ABI1: u64 = (1 << 13) - 1;
const FS_REFER: u64 = 1 << 13;
const FS_TRUNCATE: u64 = 1 << 14;

/// `struct landlock_ruleset_attr`, first field only: the kernel accepts the
/// shorter struct from every ABI version, and network rules are not needed
/// (seccomp refuses the sockets).
#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
}

/// `struct landlock_path_beneath_attr` (packed in the UAPI header).
#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

fn landlock_abi() -> Option<u32> {
    // SAFETY: the version query takes no attribute pointer.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    (v > 0).then_some(v as u32)
}

/// Read and execute everywhere; everything beneath `writable`; writing to /dev/null.
unsafe fn landlock_restrict(plan: &LandlockPlan) -> std::io::Result<()> {
    let mut handled = FS_ABI1;
    if plan.abi >= 2 {
        handled |= FS_REFER;
    }
    if plan.abi >= 3 {
        handled |= FS_TRUNCATE;
    }
    let attr = RulesetAttr {
        handled_access_fs: handled,
    };
    let ruleset = libc::syscall(
        libc::SYS_landlock_create_ruleset,
        &attr as *const RulesetAttr,
        std::mem::size_of::<RulesetAttr>(),
        0,
    ) as libc::c_int;
    check(ruleset)?;
    let file_rights = FS_READ_FILE | FS_WRITE_FILE | (handled & FS_TRUNCATE);
    for (path, access) in [
        (&plan.root, FS_EXECUTE | FS_READ_FILE | FS_READ_DIR),
        (&plan.writable, handled),
        (&plan.dev_null, file_rights),
    ] {
        let fd = libc::open(path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC);
        check(fd)?;
        let rule = PathBeneathAttr {
            allowed_access: access,
            parent_fd: fd,
        };
        let ret = libc::syscall(
            libc::SYS_landlock_add_rule,
            ruleset,
            LANDLOCK_RULE_PATH_BENEATH,
            &rule as *const PathBeneathAttr,
            0,
        ) as libc::c_int;
        libc::close(fd);
        check(ret)?;
    }
    let ret = libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0) as libc::c_int;
    libc::close(ruleset);
    check(ret)
}

// ---- seccomp (classic BPF over struct seccomp_data) -------------------------

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct SockFilter {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}

#[repr(C)]
struct SockFprog {
    len: u16,
    filter: *const SockFilter,
}

const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JEQ_K: u16 = 0x15;
const BPF_JGE_K: u16 = 0x35;
const BPF_JSET_K: u16 = 0x45;
const BPF_RET_K: u16 = 0x06;
const RET_ALLOW: u32 = 0x7fff_0000;
const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_ERRNO: u32 = 0x0005_0000;
/// Offsets in `struct seccomp_data`: nr, arch, args[0] (low half, little endian).
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
const DATA_ARG0: u32 = 16;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: Option<u32> = Some(0xC000_003E);
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: Option<u32> = Some(0xC000_00B7);
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const AUDIT_ARCH: Option<u32> = None;

fn ins(code: u16, jt: u8, jf: u8, k: u32) -> SockFilter {
    SockFilter { code, jt, jf, k }
}

/// The filter: new processes and non-Unix sockets refused, everything else allowed.
fn seccomp_filter() -> Option<Vec<SockFilter>> {
    let arch = AUDIT_ARCH?;
    let errno = |e: i32| RET_ERRNO | e as u32;
    let mut f = vec![
        ins(BPF_LD_W_ABS, 0, 0, DATA_ARCH),
        ins(BPF_JEQ_K, 1, 0, arch),
        ins(BPF_RET_K, 0, 0, RET_KILL_PROCESS),
        ins(BPF_LD_W_ABS, 0, 0, DATA_NR),
    ];
    let mut deny = |nr: libc::c_long, ret: u32| {
        f.push(ins(BPF_JEQ_K, 0, 1, nr as u32));
        f.push(ins(BPF_RET_K, 0, 0, ret));
    };
    #[cfg(target_arch = "x86_64")]
    {
        deny(libc::SYS_fork, errno(libc::EPERM));
        deny(libc::SYS_vfork, errno(libc::EPERM));
    }
    // ENOSYS makes glibc fall back to clone(2), which the flags check sees.
    deny(libc::SYS_clone3, errno(libc::ENOSYS));
    deny(libc::SYS_io_uring_setup, errno(libc::ENOSYS));
    #[cfg(target_arch = "x86_64")]
    {
        // x32 system calls (numbers with bit 30 set) would dodge the checks.
        f.push(ins(BPF_JGE_K, 0, 1, 0x4000_0000));
        f.push(ins(BPF_RET_K, 0, 0, errno(libc::ENOSYS)));
    }
    // clone: threads (CLONE_THREAD) yes, processes no.
    f.extend([
        ins(BPF_JEQ_K, 0, 4, libc::SYS_clone as u32),
        ins(BPF_LD_W_ABS, 0, 0, DATA_ARG0),
        ins(BPF_JSET_K, 0, 1, libc::CLONE_THREAD as u32),
        ins(BPF_RET_K, 0, 0, RET_ALLOW),
        ins(BPF_RET_K, 0, 0, errno(libc::EPERM)),
    ]);
    // socket: AF_UNIX only.
    f.extend([
        ins(BPF_JEQ_K, 0, 4, libc::SYS_socket as u32),
        ins(BPF_LD_W_ABS, 0, 0, DATA_ARG0),
        ins(BPF_JEQ_K, 0, 1, libc::AF_UNIX as u32),
        ins(BPF_RET_K, 0, 0, RET_ALLOW),
        ins(BPF_RET_K, 0, 0, errno(libc::EACCES)),
    ]);
    f.push(ins(BPF_RET_K, 0, 0, RET_ALLOW));
    Some(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_jumps_stay_inside_the_program() {
        let f = seccomp_filter().unwrap();
        for (i, ins) in f.iter().enumerate() {
            if ins.code & 0x07 == 0x05 {
                assert!(i + 1 + (ins.jt.max(ins.jf) as usize) < f.len(), "{i}");
            }
        }
        assert_eq!(f.last().unwrap().k, RET_ALLOW);
    }
}
