//! The commands that move data: `builddb` and `emptydb` (`db`), `plan` and
//! `fetch` (`fetch`), `store` (`store`). They use the client, the courier,
//! the plan and the wire formats; nothing uses them but `lib.rs`.

mod carry;
pub(crate) mod db;
pub(crate) mod fetch;
mod preview;
pub(crate) mod status;
pub(crate) mod store;
