//! Micro-benchmarks of the event loops: call_soon and timer throughput on
//! the proactor (io_uring) and the selector (epoll).

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use childwatch::{EventLoop, LoopKind};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

const N: u64 = 10_000;

fn kinds() -> Vec<LoopKind> {
    let mut v = vec![LoopKind::Selector];
    if childwatch::proactor_supported() {
        v.insert(0, LoopKind::Proactor);
    }
    v
}

fn call_soon(c: &mut Criterion) {
    let mut g = c.benchmark_group("call_soon");
    g.throughput(Throughput::Elements(N));
    for kind in kinds() {
        let lp = EventLoop::new(kind).expect("loop");
        g.bench_with_input(BenchmarkId::from_parameter(kind), &kind, |b, _| {
            b.iter(|| {
                let count = Rc::new(Cell::new(0u64));
                for _ in 0..N {
                    let c = Rc::clone(&count);
                    lp.call_soon(move || c.set(c.get() + 1));
                }
                let lp2 = lp.clone();
                lp.call_soon(move || lp2.stop());
                lp.run_forever().expect("run");
                assert_eq!(count.get(), N);
            })
        });
    }
    g.finish();
}

fn timers(c: &mut Criterion) {
    let mut g = c.benchmark_group("call_later");
    g.throughput(Throughput::Elements(N));
    for kind in kinds() {
        let lp = EventLoop::new(kind).expect("loop");
        g.bench_with_input(BenchmarkId::from_parameter(kind), &kind, |b, _| {
            b.iter(|| {
                let count = Rc::new(Cell::new(0u64));
                for i in 0..N {
                    let c = Rc::clone(&count);
                    // Spread over 0..100 µs so the heap really orders them.
                    lp.call_later(Duration::from_nanos((i * 7919) % 100_000), move || {
                        c.set(c.get() + 1)
                    });
                }
                let lp2 = lp.clone();
                lp.call_later(Duration::from_micros(100), move || lp2.stop());
                lp.run_forever().expect("run");
                assert_eq!(count.get(), N);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, call_soon, timers);
criterion_main!(benches);
