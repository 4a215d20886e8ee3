//! Tests of the ring core on real rings, without the proactor or the
//! watcher: each operation kind completes, what the kernel wrote comes back
//! through safe accessors, and memory stays alive until the completion.

use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use super::{OpRing, Plain, PlainRing, Read, Wait, WaitIdAll, Write};

fn pipe() -> (OwnedFd, OwnedFd) {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).expect("pipe")
}

fn child() -> Child {
    Command::new("true").spawn().expect("spawn true")
}

/// Enters `ring` until a completion tagged `tag` shows up; its result.
fn wait_for<S>(ring: &mut OpRing<S>, tag: u64) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut cqes = Vec::new();
    while Instant::now() < deadline {
        let _ = ring.enter(Wait::Upto(Duration::from_millis(50)));
        cqes.clear();
        ring.drain(&mut cqes);
        if let Some(&(_, res)) = cqes.iter().find(|&&(t, _)| t == tag) {
            return res;
        }
    }
    panic!("no completion tagged {tag}");
}

#[test]
fn plain_ring_completes_a_nop_and_a_waitid_that_reaps_nothing() {
    let mut ring = PlainRing::new(8, 16).unwrap();
    let mut c = child();
    ring.push(Plain::WaitIdPid { pid: c.id() as i32 }, 7);
    ring.push(Plain::Nop, 9);
    ring.flush().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while seen.len() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
        ring.drain(&mut seen);
    }
    seen.sort();
    assert_eq!(seen, vec![(7, 0), (9, 0)]);
    // WNOWAIT: the child is still there to be reaped.
    assert!(c.wait().unwrap().success());
}

#[test]
fn plain_ring_takes_more_entries_than_its_queue_holds() {
    let mut ring = PlainRing::new(2, 4).unwrap();
    for tag in 0..20 {
        ring.push(Plain::Nop, tag);
    }
    ring.flush().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while seen.len() < 20 && Instant::now() < deadline {
        ring.flush().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        ring.drain(&mut seen);
    }
    let mut tags: Vec<u64> = seen.iter().map(|&(t, _)| t).collect();
    tags.sort();
    assert_eq!(tags, (0..20).collect::<Vec<_>>());
}

#[test]
fn waitid_all_reports_the_pid_of_a_zombie_child() {
    let mut ring = OpRing::<()>::new(8, 16).unwrap();
    let mut c = child();
    let ticket = ring.submit(WaitIdAll::new(), (), true);
    let res = wait_for(&mut ring, ticket.key() as u64);
    assert_eq!(res, 0);
    let ((), op) = ring.take(&ticket, res).unwrap();
    let pid = op.expect("the kernel is done with it").pid();
    // Other tests' children may be the zombie reported; it is one of ours.
    assert!(pid > 0, "pid {pid}");
    assert!(c.wait().unwrap().success());
}

#[test]
fn read_fills_its_owned_buffer_and_write_gives_its_back() {
    let mut ring = OpRing::<()>::new(8, 16).unwrap();
    let (r, w) = pipe();
    let t = ring.submit(Write::new(w.as_raw_fd(), b"--abc".to_vec(), 2), (), true);
    let res = wait_for(&mut ring, t.key() as u64);
    assert_eq!(res, 3);
    let ((), buf) = ring.take(&t, res).unwrap();
    assert_eq!(buf.unwrap(), b"--abc");
    let mut buf = Vec::with_capacity(16);
    buf.push(b'x');
    let t = ring.submit(Read::new(r.as_raw_fd(), buf), (), true);
    let res = wait_for(&mut ring, t.key() as u64);
    assert_eq!(res, 3);
    let ((), buf) = ring.take(&t, res).unwrap();
    assert_eq!(buf.unwrap(), b"xabc");
}

#[test]
fn an_op_removed_early_keeps_its_memory_and_key_until_its_completion() {
    let mut ring = OpRing::<u8>::new(8, 16).unwrap();
    let (r, w) = pipe();
    let t = ring.submit(Read::new(r.as_raw_fd(), Vec::with_capacity(64)), 1, true);
    ring.enter(Wait::No).unwrap();
    // Taken before the kernel is done: the state comes back, the buffer
    // does not (it stays in a tombstone).
    let (state, buf) = ring.take(&t, 0).unwrap();
    assert_eq!((state, buf.is_none()), (1, true));
    assert_eq!(ring.states().count(), 0);
    // The key is not reused while the kernel may still write there.
    let other = ring.submit(
        Plain::PollAdd {
            fd: r.as_raw_fd(),
            events: libc::POLLIN as u32,
        },
        2,
        false,
    );
    assert_ne!(other.key(), t.key());
    rustix::io::write(&w, b"late").unwrap();
    assert_eq!(wait_for(&mut ring, t.key() as u64), 4);
    // The completion freed the tombstone: its key is free again.
    let again = ring.submit(
        Plain::PollAdd {
            fd: r.as_raw_fd(),
            events: libc::POLLIN as u32,
        },
        3,
        false,
    );
    assert_eq!(again.key(), t.key());
    assert_eq!(ring.remove(other.key()), Some(2));
}

#[test]
fn an_op_not_sent_to_the_kernel_comes_back_at_once() {
    let mut ring = OpRing::<()>::new(8, 16).unwrap();
    let t = ring.submit_keeping(WaitIdAll::new(), "kept", (), false);
    let ((), out) = ring.take(&t, -libc::ECANCELED).unwrap();
    let (op, kept) = out.unwrap();
    assert_eq!((op.pid(), kept), (0, "kept"));
}

#[test]
#[should_panic(expected = "collides")]
fn tagged_entries_cannot_use_operation_keys() {
    let mut ring = OpRing::<()>::new(8, 16).unwrap();
    ring.push_tagged(Plain::Cancel { user_data: 1 }, 0);
}

#[test]
fn a_closed_ring_leaks_what_the_kernel_holds_and_keeps_its_table() {
    // (That closing frees the descriptor is checked from the outside, one
    // test at a time, in tests/loop_lifecycle.rs.)
    let (r, w) = pipe();
    let mut ring = OpRing::<u8>::new(8, 16).unwrap();
    let pending = ring.submit(Read::new(r.as_raw_fd(), Vec::with_capacity(64)), 1, true);
    let removed = ring.submit(Read::new(r.as_raw_fd(), Vec::with_capacity(64)), 2, true);
    ring.enter(Wait::No).unwrap();
    assert_eq!(ring.remove(removed.key()), Some(2));
    ring.close();
    // The kernel still had the read: its state is there, its buffer leaked
    // (nothing comes back), and the tombstone of the removed one is gone.
    assert_eq!(ring.states().count(), 1);
    let (state, buf) = ring.take(&pending, -libc::ECANCELED).unwrap();
    assert_eq!((state, buf.is_none()), (1, true));
    assert_eq!(ring.states().count(), 0);
    // Writing now must not touch freed memory (under a sanitizer).
    rustix::io::write(&w, b"late").unwrap();
    // Later operations never reach a kernel and come back with what they own.
    let t = ring.submit_keeping(WaitIdAll::new(), "kept", 3, false);
    let (state, out) = ring.take(&t, -libc::ECANCELED).unwrap();
    assert_eq!((state, out.unwrap().1), (3, "kept"));
    ring.push_tagged(Plain::Nop, super::FIRST_TAG);
    assert_eq!(
        ring.enter(Wait::No).unwrap_err().raw_os_error(),
        Some(libc::EBADF)
    );
    let mut cqes = Vec::new();
    ring.drain(&mut cqes);
    assert!(cqes.is_empty());
    ring.close();
}
