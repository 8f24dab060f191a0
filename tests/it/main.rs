//! One integration test binary: every test drives the real `bitfog`
//! executable against real `bitfog serve` processes on 127.0.0.1:0, each in
//! its own scratch directory.

mod batch;
mod bounds;
mod browse;
mod carry;
mod cli;
mod crypt;
mod delta;
mod disks;
mod exclude;
mod hardlinks;
mod hostile;
mod identity;
mod mirror;
mod proxy;
mod sealed;
mod serve;
mod ssh;
mod status;
mod trip;
mod util;
