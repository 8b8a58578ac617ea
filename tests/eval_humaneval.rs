//! The HumanEval harness without a model: the canonical solutions must pass
//! 164/164 through the same sandbox model completions run in, and hostile
//! completions must be stopped or refused, counted as failures, and leave
//! nothing behind while the run goes on.

mod common;

use std::sync::Mutex;
use std::time::Duration;

use qcoder::eval::humaneval::{self, Problem};
use qcoder::eval::sandbox::{Limits, Sandbox, Verdict};

/// The tests look for leftover sandbox processes: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn problems() -> Vec<Problem> {
    humaneval::read_problems(&common::asset("humaneval")).expect("reading HumanEval")
}

/// Processes still running a sandboxed program (their command line names
/// the sandbox's temporary directory).
fn sandbox_processes() -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains("qcoder-sandbox-") {
                found.push(format!(
                    "{}: {cmdline}",
                    entry.file_name().to_string_lossy()
                ));
            }
        }
    }
    found
}

#[test]
fn canonical_solutions_pass_164_of_164() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let problems = problems();
    assert_eq!(problems.len(), 164);
    let sandbox = Sandbox::new(Limits::default()).unwrap();
    eprintln!("sandbox: {:?}", sandbox.isolation());
    let mut failures = Vec::new();
    for p in &problems {
        let r = humaneval::check_completion(&sandbox, p, &p.canonical_solution, 0).unwrap();
        if !r.passed {
            failures.push(format!(
                "{}: {:?}\n{}",
                r.task_id, r.execution.verdict, r.execution.stderr_tail
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} canonical solutions failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    assert!(sandbox_processes().is_empty(), "{:?}", sandbox_processes());
}

#[test]
fn hostile_completions_fail_and_the_run_goes_on() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let problems = problems();
    let problem = &problems[0]; // has_close_elements(numbers, threshold)
    let timeout = Duration::from_secs(3);
    let sandbox = Sandbox::new(Limits {
        timeout,
        cpu_seconds: 3,
        ..Limits::default()
    })
    .unwrap();
    let isolation = sandbox.isolation().clone();
    eprintln!("sandbox: {isolation:?}");

    // A directory anyone may write to: only the sandbox can keep the program out.
    let open_dir = tempfile::tempdir().unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(open_dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let escape = open_dir.path().join("escaped.txt");
    let escape_tmp = std::env::temp_dir().join(format!("qcoder-escape-{}.txt", std::process::id()));

    let cases: Vec<(&str, String)> = vec![
        ("infinite loop", "    while True:\n        pass\n".into()),
        (
            "10 GB allocation",
            "    x = bytearray(10 * 1024 ** 3)\n    x[-1] = 1\n    return True\n".into(),
        ),
        (
            "fork bomb",
            "    import os\n    while True:\n        os.fork()\n".into(),
        ),
        (
            "write outside its directory",
            format!(
                "    open({:?}, 'w').write('x')\n    open({:?}, 'w').write('x')\n    return True\n",
                escape.display().to_string(),
                escape_tmp.display().to_string()
            ),
        ),
        (
            "socket",
            "    import socket\n    socket.create_connection(('127.0.0.1', 9), timeout=1)\n    return True\n"
                .into(),
        ),
        (
            "UDP to the outside",
            "    import socket\n    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n    s.sendto(b'x', ('8.8.8.8', 53))\n    return True\n"
                .into(),
        ),
    ];
    for (what, completion) in &cases {
        let start = std::time::Instant::now();
        let r = humaneval::check_completion(&sandbox, problem, completion, 0).unwrap();
        eprintln!(
            "{what}: {:?} after {:.2}s: {}",
            r.execution.verdict,
            start.elapsed().as_secs_f64(),
            r.execution.stderr_tail.lines().last().unwrap_or("")
        );
        assert!(!r.passed, "{what} passed: {r:?}");
        assert!(
            start.elapsed() < timeout + Duration::from_secs(2),
            "{what} ran past the timeout"
        );
        if *what == "infinite loop" {
            assert_eq!(r.execution.verdict, Verdict::TimedOut);
        } else {
            // Refused outright, not left to time out.
            assert!(
                matches!(r.execution.verdict, Verdict::Failed { .. }),
                "{what}: {r:?}"
            );
        }
        assert!(
            sandbox_processes().is_empty(),
            "{what} left processes: {:?}",
            sandbox_processes()
        );
    }
    if isolation.landlock_abi.is_some() {
        assert!(!escape.exists(), "wrote {}", escape.display());
        assert!(!escape_tmp.exists(), "wrote {}", escape_tmp.display());
    } else {
        eprintln!("note: no Landlock on this kernel; file writes are limited by permissions only");
        let _ = std::fs::remove_file(&escape_tmp);
    }

    // The run goes on: the same sandbox still passes a correct solution.
    let r = humaneval::check_completion(&sandbox, problem, &problem.canonical_solution, 0).unwrap();
    assert!(r.passed, "{r:?}");
}

/// A busy loop stopped by the kernel at its CPU limit (before the wall-clock
/// timeout) is a timeout too, not a failure by signal.
#[test]
fn cpu_limit_counts_as_a_timeout() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let problems = problems();
    let problem = &problems[0];
    let sandbox = Sandbox::new(Limits {
        timeout: Duration::from_secs(20),
        cpu_seconds: 1,
        ..Limits::default()
    })
    .unwrap();
    let start = std::time::Instant::now();
    let r = humaneval::check_completion(&sandbox, problem, "    while True:\n        pass\n", 0)
        .unwrap();
    assert!(!r.passed);
    assert_eq!(r.execution.verdict, Verdict::TimedOut, "{r:?}");
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "the CPU limit did not stop it"
    );
    // An ordinary failure stays a failure.
    let r = humaneval::check_completion(&sandbox, problem, "    raise SystemExit(3)\n", 0).unwrap();
    assert!(
        matches!(
            r.execution.verdict,
            Verdict::Failed {
                exit_code: Some(3),
                ..
            }
        ),
        "{r:?}"
    );
    assert!(sandbox_processes().is_empty(), "{:?}", sandbox_processes());
}

#[test]
fn reads_plain_and_gzipped_jsonl_and_rejects_bad_files() {
    let tmp = tempfile::tempdir().unwrap();
    let line = serde_json::json!({
        "task_id": "t/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
        "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"
    })
    .to_string();
    let plain = tmp.path().join("p.jsonl");
    std::fs::write(&plain, format!("{line}\n\n")).unwrap();
    assert_eq!(
        humaneval::read_problems(&plain).unwrap()[0].entry_point,
        "f"
    );
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"task_id\": 1}\n").unwrap();
    let e = humaneval::read_problems(&bad).unwrap_err().to_string();
    assert!(e.contains("bad.jsonl:1"), "{e}");
    let e = humaneval::read_problems(&tmp.path().join("none.jsonl.gz"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not found"), "{e}");
}
