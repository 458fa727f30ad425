//! Build `integrations/c/example.c` with the system C compiler against the committed header and
//! run it: linked to the shared library, linked statically under AddressSanitizer, and under
//! valgrind where it is installed.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `target/<profile>`, where cargo put libkvsieve.so/.a next to this test's `deps/`.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

fn cc() -> String {
    std::env::var("CC").unwrap_or_else(|_| "cc".into())
}

fn out_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("c_example");
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run_checked(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn compile(extra: &[&str], link: &[&str], exe: &Path) {
    let mut cmd = Command::new(cc());
    cmd.args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-g", "-I"])
        .arg(root().join("include"))
        .arg(root().join("integrations/c/example.c"))
        .args(extra)
        .arg("-o")
        .arg(exe)
        .args(link);
    run_checked(&mut cmd, "compiling integrations/c/example.c");
}

fn check_output(stdout: &str) {
    assert!(
        stdout.contains(&format!("kvsieve {}", env!("CARGO_PKG_VERSION"))),
        "{stdout}"
    );
    // 8000 tokens, budget 1024, block 16: 6976 over = 436 whole blocks released, 1024 kept.
    assert!(
        stdout.contains("      8000       1024       6976        436"),
        "{stdout}"
    );
    assert!(
        stdout.contains("refused as expected (KVS_STATUS_CONFIG_INVALID)"),
        "{stdout}"
    );
    assert!(stdout.trim_end().ends_with("ok"), "{stdout}");
    // Out of place first: the kept tokens land in the four fresh blocks, the row is unchanged.
    assert!(
        stdout.contains("compacted out of place into blocks 9 4 10 8; the row is unchanged"),
        "{stdout}"
    );
    assert!(
        stdout.contains("refused as expected (KVS_STATUS_INVALID_ARGUMENT)"),
        "{stdout}"
    );
    // 100 tokens, budget 40, blocks of 16: 52 kept, the row's last three blocks (6 1 3) go back.
    assert!(
        stdout.contains("compacted 100 -> 52 tokens per head, released blocks: 6 1 3"),
        "{stdout}"
    );
}

#[test]
fn c_example_links_the_shared_library() {
    let exe = out_dir().join("example-shared");
    let dir = lib_dir();
    assert!(
        dir.join("libkvsieve.so").exists(),
        "{}/libkvsieve.so missing: `cargo test` builds only the rlib; run `cargo build` first (scripts/test.sh does)",
        dir.display()
    );
    compile(&[], &["-L", dir.to_str().unwrap(), "-lkvsieve"], &exe);
    let stdout = run_checked(
        Command::new(&exe).env("LD_LIBRARY_PATH", &dir),
        "example (shared)",
    );
    check_output(&stdout);

    if Command::new("valgrind").arg("--version").output().is_ok() {
        let stdout = run_checked(
            Command::new("valgrind")
                .args([
                    "--error-exitcode=99",
                    "--leak-check=full",
                    "--errors-for-leak-kinds=definite",
                    "-q",
                ])
                .arg(&exe)
                .env("LD_LIBRARY_PATH", &dir),
            "example under valgrind",
        );
        check_output(&stdout);
    } else {
        eprintln!("valgrind not installed: skipping the valgrind run (ASan still runs)");
    }
}

#[test]
fn c_example_links_the_static_library_under_asan() {
    let exe = out_dir().join("example-asan");
    let lib = lib_dir().join("libkvsieve.a");
    assert!(
        lib.exists(),
        "{} missing: `cargo test` builds only the rlib; run `cargo build` first (scripts/test.sh does)",
        lib.display()
    );
    compile(
        &["-fsanitize=address,undefined", "-fno-omit-frame-pointer"],
        &[lib.to_str().unwrap(), "-lpthread", "-ldl", "-lm"],
        &exe,
    );
    let stdout = run_checked(
        Command::new(&exe).env("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0"),
        "example under AddressSanitizer",
    );
    check_output(&stdout);
}
