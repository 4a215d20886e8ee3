//! asyncio's low-level subprocess API: a `SubprocessProtocol` driven by
//! `EventLoop::subprocess_exec` (the example in the README).
//!
//! `cargo run -p childwatch --example protocol`

#[cfg(target_os = "linux")]
mod linux {
    use childwatch::{Stdio, SubprocessProtocol, SubprocessTransport, create_subprocess_exec};
    use std::{cell::RefCell, io, rc::Rc};

    #[derive(Default)]
    struct Collect {
        out: Vec<u8>,
        rc: Option<i32>,
        done: bool,
    }

    impl SubprocessProtocol for Collect {
        fn connection_made(&mut self, t: &SubprocessTransport) {
            let stdin = t.get_pipe_transport(0).unwrap();
            stdin.write(b"hello\n").unwrap(); // buffered, never blocks
            stdin.write_eof().unwrap();
        }
        fn pipe_data_received(&mut self, _fd: i32, data: &[u8]) {
            self.out.extend_from_slice(data)
        }
        fn connection_lost(&mut self, _exc: Option<io::Error>) {
            self.done = true
        } // last, once
    }

    pub fn main() -> io::Result<()> {
        let lp = childwatch::new_event_loop()?;
        let lp2 = lp.clone();
        let proto: Rc<RefCell<Collect>> = lp.run_until_complete(async move {
            let mut cat = create_subprocess_exec("cat", [] as [&str; 0]);
            cat.stdin(Stdio::piped()).stdout(Stdio::piped());
            let (transport, proto) = lp2.subprocess_exec(Collect::default, &mut cat).await?;
            while !proto.borrow().done {
                childwatch::sleep(std::time::Duration::from_millis(1)).await
            }
            proto.borrow_mut().rc = transport.get_returncode(); // also: send_signal, kill, close
            Ok::<_, io::Error>(proto)
        })??;
        assert_eq!(
            (&proto.borrow().out[..], proto.borrow().rc),
            (&b"hello\n"[..], Some(0))
        );
        lp.close()
    }
}

#[cfg(target_os = "linux")]
fn main() -> std::io::Result<()> {
    linux::main()
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("this example runs `cat`; it is written for Linux");
}
