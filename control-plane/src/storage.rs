//! The embedded store under `--data-dir`: a thin, generic layer over [redb] that every
//! weir-cp subsystem shares (xDS config and its history, the KV store; the service registry and
//! object metadata later).
//!
//! The model is deliberately small: named tables of byte keys to byte values, and
//! transactions. Callers choose their own encodings (big-endian integers for ordered keys,
//! JSON or protobuf values) and table names (prefix them with the subsystem: `xds.…`,
//! `registry.…`). A write transaction either commits durably (redb's default
//! `Durability::Immediate`: fsync before `commit` returns) or not at all, so a caller that
//! acknowledges only after [`Store::write`] returns is safe against `kill -9` and power loss.
//!
//! [`Store::in_memory`] gives the same API without a file, for tests and for running without
//! `--data-dir`.

use std::path::Path;

use redb::{ReadableTable as _, ReadableTableMetadata as _, TableDefinition};

/// The file inside `--data-dir` holding the database.
pub const DB_FILE: &str = "weir-cp.redb";

/// Storage errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database failed (opening, a transaction, a table, an access or the commit).
    #[error("store: {0}")]
    Db(Box<redb::Error>),
    /// Creating the data directory failed.
    #[error("creating {path}: {source}")]
    Dir {
        /// The directory.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(Box::new(e.into()))
            }
        }
    )*};
}

from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// A key and its value.
pub type Entry = (Vec<u8>, Vec<u8>);

fn table(name: &str) -> TableDefinition<'_, &'static [u8], &'static [u8]> {
    TableDefinition::new(name)
}

/// The shared embedded database.
pub struct Store {
    db: redb::Database,
    /// The directory holding the file (`None` in memory).
    dir: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Open (or create) the store in `dir`, creating the directory if missing.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
            path: dir.display().to_string(),
            source,
        })?;
        let db = redb::Database::create(dir.join(DB_FILE))?;
        Ok(Store {
            db,
            dir: Some(dir.to_path_buf()),
        })
    }

    /// A store that lives in memory only.
    pub fn in_memory() -> Result<Self, StoreError> {
        let db =
            redb::Database::builder().create_with_backend(redb::backends::InMemoryBackend::new())?;
        Ok(Store { db, dir: None })
    }

    /// Run `f` in a write transaction and commit durably. If `f` fails nothing is written.
    pub fn write<T, E>(&self, f: impl FnOnce(&mut Writer<'_>) -> Result<T, E>) -> Result<T, E>
    where
        E: From<StoreError>,
    {
        let txn = self.db.begin_write().map_err(StoreError::from)?;
        let mut w = Writer::new(&txn);
        let out = f(&mut w)?;
        drop(w);
        txn.commit().map_err(StoreError::from)?;
        Ok(out)
    }

    /// The directory the store lives in (`None` in memory): a subsystem keeping files of
    /// its own beside the database (the KV's write-ahead log) puts them there.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// [`Store::write`], but the commit is **not durable** (redb's `Durability::None`: visible
    /// to readers at once, made durable by the next durable commit of any subsystem or by
    /// [`Store::sync`]; after a crash the store is back at the last durable commit). Only for
    /// a caller that keeps its own durable log of what it writes (the KV's write-ahead log).
    pub fn write_non_durable<T, E>(
        &self,
        f: impl FnOnce(&mut Writer<'_>) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<StoreError>,
    {
        let mut txn = self.db.begin_write().map_err(StoreError::from)?;
        txn.set_durability(redb::Durability::None);
        let mut w = Writer::new(&txn);
        let out = f(&mut w)?;
        drop(w);
        txn.commit().map_err(StoreError::from)?;
        Ok(out)
    }

    /// Make every earlier commit durable (an empty durable commit: one fsync).
    pub fn sync(&self) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.commit()?;
        Ok(())
    }

    /// A consistent read view.
    pub fn read(&self) -> Result<Reader, StoreError> {
        Ok(Reader {
            txn: self.db.begin_read()?,
        })
    }
}

type WriteTable<'a> = redb::Table<'a, &'static [u8], &'static [u8]>;

/// Writes inside [`Store::write`]. Each table is opened once per transaction and kept open
/// until the transaction ends (a batch of KV writes touches the same few tables many times;
/// opening one looks it up in redb's table tree and writes its root back on close).
pub struct Writer<'a> {
    txn: &'a redb::WriteTransaction,
    /// The tables opened so far, by name (a handful: a linear search beats hashing).
    open: Vec<(String, WriteTable<'a>)>,
}

impl<'a> Writer<'a> {
    fn new(txn: &'a redb::WriteTransaction) -> Self {
        Writer {
            txn,
            open: Vec::new(),
        }
    }

    /// `table_name`, opened (and created) on first use in this transaction.
    fn table(&mut self, table_name: &str) -> Result<&mut WriteTable<'a>, StoreError> {
        let i = match self.open.iter().position(|(n, _)| n == table_name) {
            Some(i) => i,
            None => {
                let t = self.txn.open_table(table(table_name))?;
                self.open.push((table_name.to_string(), t));
                self.open.len() - 1
            }
        };
        // `i` came from `position` or the push above.
        Ok(&mut self.open[i].1)
    }

    /// Set `key` to `value` in `table` (created on first use).
    pub fn put(&mut self, table_name: &str, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.table(table_name)?.insert(key, value)?;
        Ok(())
    }

    /// Remove `key`; whether it was there.
    pub fn delete(&mut self, table_name: &str, key: &[u8]) -> Result<bool, StoreError> {
        Ok(self.table(table_name)?.remove(key)?.is_some())
    }

    /// Read `key` as of this transaction (including its own writes).
    pub fn get(&mut self, table_name: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .table(table_name)?
            .get(key)?
            .map(|v| v.value().to_vec()))
    }

    /// Visit the entries of `table` with `start <= key < end` (`end` `None`: to the last key)
    /// in key order, as of this transaction, until `f` returns `false`.
    pub fn range_visit(
        &mut self,
        table_name: &str,
        start: &[u8],
        end: Option<&[u8]>,
        mut f: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let t = self.table(table_name)?;
        visit(t, start, end, &mut f)
    }
}

/// A read transaction.
pub struct Reader {
    txn: redb::ReadTransaction,
}

impl Reader {
    /// The value of `key`; `None` when the key or the table does not exist.
    pub fn get(&self, table_name: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let t = match self.txn.open_table(table(table_name)) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(t.get(key)?.map(|v| v.value().to_vec()))
    }

    /// Every entry of `table` in key order (empty when the table does not exist).
    pub fn scan(&self, table_name: &str) -> Result<Vec<Entry>, StoreError> {
        let t = match self.txn.open_table(table(table_name)) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for entry in t.iter()? {
            let (k, v) = entry?;
            out.push((k.value().to_vec(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// Visit the entries of `table` with `start <= key < end` (`end` `None`: to the last key)
    /// in key order until `f` returns `false` (nothing when the table does not exist).
    pub fn range_visit(
        &self,
        table_name: &str,
        start: &[u8],
        end: Option<&[u8]>,
        mut f: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let t = match self.txn.open_table(table(table_name)) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        visit(&t, start, end, &mut f)
    }

    /// Number of entries in `table` (0 when it does not exist).
    pub fn len(&self, table_name: &str) -> Result<u64, StoreError> {
        match self.txn.open_table(table(table_name)) {
            Ok(t) => Ok(t.len()?),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }
}

fn visit(
    t: &impl redb::ReadableTable<&'static [u8], &'static [u8]>,
    start: &[u8],
    end: Option<&[u8]>,
    f: &mut impl FnMut(&[u8], &[u8]) -> bool,
) -> Result<(), StoreError> {
    if end.is_some_and(|e| e <= start) {
        return Ok(());
    }
    let iter = match end {
        Some(e) => t.range::<&[u8]>(start..e)?,
        None => t.range::<&[u8]>(start..)?,
    };
    for entry in iter {
        let (k, v) = entry?;
        if !f(k.value(), v.value()) {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "weir-cp-store-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn write_read_scan_delete() {
        let s = Store::in_memory().expect("store");
        assert_eq!(s.read().expect("r").get("t", b"a").expect("get"), None);
        assert!(s.read().expect("r").scan("t").expect("scan").is_empty());
        s.write(|w| {
            w.put("t", b"b", b"2")?;
            w.put("t", b"a", b"1")?;
            assert_eq!(w.get("t", b"a")?, Some(b"1".to_vec()));
            Ok::<_, StoreError>(())
        })
        .expect("write");
        let r = s.read().expect("r");
        assert_eq!(
            r.scan("t").expect("scan"),
            vec![
                (b"a".to_vec(), b"1".to_vec()),
                (b"b".to_vec(), b"2".to_vec())
            ]
        );
        let mut seen = Vec::new();
        s.read()
            .expect("r")
            .range_visit("t", b"a", Some(b"b"), |k, _| {
                seen.push(k.to_vec());
                true
            })
            .expect("range");
        assert_eq!(seen, vec![b"a".to_vec()]);
        assert_eq!(s.read().expect("r").len("t").expect("len"), 2);
        assert_eq!(s.read().expect("r").len("none").expect("len"), 0);
        s.write(|w| w.delete("t", b"a")).expect("delete");
        assert_eq!(s.read().expect("r").get("t", b"a").expect("get"), None);
    }

    #[test]
    fn failed_transaction_writes_nothing() {
        #[derive(Debug)]
        struct Boom;
        impl From<StoreError> for Boom {
            fn from(_: StoreError) -> Self {
                Boom
            }
        }
        let s = Store::in_memory().expect("store");
        let r: Result<(), Boom> = s.write(|w| {
            w.put("t", b"k", b"v")?;
            Err(Boom)
        });
        assert!(r.is_err());
        assert_eq!(s.read().expect("r").get("t", b"k").expect("get"), None);
    }

    #[test]
    fn non_durable_writes_are_visible_and_made_durable_by_sync() {
        let dir = temp_dir("sync");
        {
            let s = Store::open(&dir).expect("open");
            assert_eq!(s.dir(), Some(dir.as_path()));
            s.write_non_durable(|w| w.put("t", b"k", b"v"))
                .expect("write");
            assert_eq!(
                s.read().expect("r").get("t", b"k").expect("get"),
                Some(b"v".to_vec())
            );
            s.sync().expect("sync");
        }
        let s = Store::open(&dir).expect("reopen");
        assert_eq!(
            s.read().expect("r").get("t", b"k").expect("get"),
            Some(b"v".to_vec())
        );
        assert_eq!(Store::in_memory().expect("mem").dir(), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn survives_reopen() {
        let dir = temp_dir("reopen");
        {
            let s = Store::open(&dir).expect("open");
            s.write(|w| w.put("t", b"k", b"v")).expect("write");
        }
        let s = Store::open(&dir).expect("reopen");
        assert_eq!(
            s.read().expect("r").get("t", b"k").expect("get"),
            Some(b"v".to_vec())
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
