//! `telemetry-wal`: a durable, ordered append log on sled.
//!
//! Producers [`Appender::append`] opaque records; one writer thread gathers everything queued (group commit),
//! writes it as a few sled values, makes it durable with one flush plus an `fdatasync` of sled's data file,
//! and only then answers every waiter with the record's sequence number. Readers see durable records only,
//! in sequence order, through [`Wal::read_after`], and keep their position in named, persisted cursors.
//! [`Wal::truncate`] drops what every gating cursor has passed.
//!
//! Vocabulary: a *record* is one payload with its `seq`; a *chunk* is the sled value that holds a run of
//! consecutive records (keyed by its first seq, big-endian, so sled iterates in order); a *group commit*
//! writes one or more chunks with one flush.
//!
//! On disk, a WAL directory holds `wal.lock` (the pid of the process that has it open), `acked-seq` (the
//! acknowledged mark) and sled's database in `sled/`, with these trees: `records` (chunks, keyed by their
//! first seq), `cursors` (name -> the last seq passed), `meta` (`high_water` and `seq_lease`, which keep seqs
//! from ever being handed out twice, and `label/<name>` strings), `dead_letters` (keyed by `sink \0 seq`) and
//! one `table/<name>` tree per table. Every seq in a key or value is a big-endian u64.
//!
//! [`Durability::Fsync`] acknowledges a group once its flush and `fdatasync` returned;
//! [`Durability::Interval`] once it is in sled's memory, a flusher syncing every interval, with seqs leased
//! durably ahead so that those of lost records never come back. The acknowledged mark is the newest seq
//! acknowledged: sled's recovery silently drops the tail of a damaged log, and a mark beyond what it recovered
//! is how open notices.
//!
//! The modules follow the stages of the log: `open` and `recovery`, `append`, `durability` (flush, sync, and
//! the failure that stops the WAL), `read` (records and cursors), `truncate`, `tables` (and labels),
//! `dead_letters`; `chunk` and `mark` are on-disk formats, `error` the one error type.

mod append;
mod chunk;
mod dead_letters;
mod durability;
mod error;
/// Entry points for the fuzz targets in `fuzz/` (not part of the API).
#[doc(hidden)]
pub mod fuzzing;
mod mark;
mod open;
mod read;
mod recovery;
mod tables;
mod truncate;

pub use append::{Appender, Pending, MAX_RECORD_BYTES};
pub use dead_letters::DeadLetter;
pub use durability::Durability;
pub use error::WalError;
pub use open::{Wal, WalOptions, WalStats};
pub use read::Record;
pub use recovery::{LostRange, Salvage};
pub use tables::Table;
pub use truncate::{PRESSURE_DISK_PERCENT, PRESSURE_RECORDS_DIVISOR};
