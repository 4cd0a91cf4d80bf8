//! Native core of cluster-rs.
//!
//! - `sys`: portable, close-on-exec socket syscalls.
//! - `sockets`: the listening and shared sockets a primary creates.
//! - `wire`: the record protocol of a primary↔worker data channel.
//! - `dispatch`: the primary's accept-and-hand-off thread.
//! - `ledger`: fair shares when workers accept themselves.
//! - `acceptor` (Linux): a worker's own accept under the ledger.
//! - `worker_channel`: the worker's receiving end.
//! - `supervise`: restart backoff and its timers.
//! - `parent`: a worker's tie to its primary's life.
//! - `binding` (feature `node`): the napi functions `lib/native.js` calls.

#[cfg(target_os = "linux")]
pub mod acceptor;
pub mod dispatch;
pub mod ledger;
pub mod parent;
pub mod sockets;
pub mod supervise;
pub mod sys;
pub mod wire;
pub mod worker_channel;

// Not in unit-test builds: napi-derive registers nothing under cfg(test), and
// the bindings are exercised by the JavaScript suite in __test__/.
#[cfg(all(feature = "node", not(test)))]
mod binding;
