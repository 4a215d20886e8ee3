//! Runs `ls -l` (or `ls -l <args>`) as a subprocess on the policy's event
//! loop and prints its output and return code: the smallest complete use of
//! `create_subprocess_exec`.
//!
//! `cargo run -p childwatch --example ls -- /tmp`

#[cfg(target_os = "linux")]
use childwatch::{Stdio, create_subprocess_exec, new_event_loop};

#[cfg(target_os = "linux")]
fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let lp = new_event_loop()?;
    let (out, err, rc) = lp.run_until_complete(async {
        let mut p = create_subprocess_exec("ls", std::iter::once("-l".to_string()).chain(args))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let (out, err) = p.communicate(None).await?;
        Ok::<_, std::io::Error>((out, err, p.returncode()))
    })??;
    print!("{}", String::from_utf8_lossy(&out));
    eprint!("{}", String::from_utf8_lossy(&err));
    println!("ls exited with returncode {rc:?} ({:?} loop)", lp.kind());
    lp.close()
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("the subprocess layer is Linux-only for now");
}
