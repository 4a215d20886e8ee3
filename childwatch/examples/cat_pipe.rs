//! Pipes data through `cat` by hand: writes lines to the child's stdin with
//! `AsyncWrite`, closes it, and reads the echo back from stdout with
//! `AsyncRead`, on the proactor (io_uring) loop and then on the selector
//! (epoll) loop.
//!
//! `cargo run -p childwatch --example cat_pipe`

#[cfg(target_os = "linux")]
use childwatch::{EventLoop, Stdio, create_subprocess_exec};
#[cfg(target_os = "linux")]
use futures_util::AsyncWriteExt; // read_to_string is ChildStdout's own

#[cfg(target_os = "linux")]
fn pipe_through_cat(lp: &EventLoop) -> std::io::Result<()> {
    let echoed = lp.run_until_complete(async {
        let mut p = create_subprocess_exec("cat", [] as [&str; 0])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut stdin = p.stdin.take().expect("stdin is piped");
        for i in 0..5 {
            stdin.write_all(format!("line {i}\n").as_bytes()).await?;
        }
        stdin.close().await?; // cat sees end-of-file and exits
        let mut echoed = String::new();
        p.stdout
            .as_mut()
            .expect("stdout is piped")
            .read_to_string(&mut echoed)
            .await?;
        let rc = p.wait().await?;
        println!("cat exited with {rc}");
        Ok::<_, std::io::Error>(echoed)
    })??;
    print!("{echoed}");
    Ok(())
}

#[cfg(target_os = "linux")]
fn main() -> std::io::Result<()> {
    for lp in [EventLoop::proactor(), EventLoop::selector()] {
        match lp {
            Ok(lp) => {
                println!("--- {} loop", lp.kind());
                pipe_through_cat(&lp)?;
                lp.close()?;
            }
            Err(e) => println!("--- skipped a loop: {e}"),
        }
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("the subprocess layer is Linux-only for now");
}
