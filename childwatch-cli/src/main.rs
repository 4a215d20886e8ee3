//! The `childwatch` command-line tool (for now: version and supported loop kinds).

fn main() {
    println!("childwatch {}", env!("CARGO_PKG_VERSION"));
    println!(
        "proactor (io_uring): {}",
        if childwatch::proactor_supported() {
            "supported"
        } else {
            "unsupported"
        }
    );
    println!("selector (epoll): supported");
}
