//! Space reserved in each pool by the downloads in flight, so two downloads cannot both pass
//! the space check against the same free bytes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// Bytes reserved per pool directory, per object UID.
#[derive(Default)]
pub struct Reservations {
    map: Mutex<HashMap<PathBuf, HashMap<String, u64>>>,
}

/// A reservation, released when dropped.
pub struct Reserved {
    owner: Arc<Reservations>,
    dir: PathBuf,
    uid: String,
}

impl Drop for Reserved {
    fn drop(&mut self) {
        let mut map = self.owner.lock();
        if let Some(pool) = map.get_mut(&self.dir) {
            pool.remove(&self.uid);
            if pool.is_empty() {
                map.remove(&self.dir);
            }
        }
    }
}

impl Reservations {
    fn lock(&self) -> MutexGuard<'_, HashMap<PathBuf, HashMap<String, u64>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves `bytes` in `dir` for `uid` when `fits(reserved by the others)` says so, in one
    /// step; the bytes the others hold otherwise.
    pub fn reserve<E>(
        self: &Arc<Self>,
        dir: &Path,
        uid: &str,
        bytes: u64,
        fits: impl FnOnce(u64) -> Result<(), E>,
    ) -> Result<Reserved, E> {
        let mut map = self.lock();
        let pool = map.entry(dir.to_path_buf()).or_default();
        let others: u64 = pool
            .iter()
            .filter(|(u, _)| u.as_str() != uid)
            .map(|(_, b)| *b)
            .sum();
        fits(others)?;
        pool.insert(uid.to_string(), bytes);
        Ok(Reserved {
            owner: Arc::clone(self),
            dir: dir.to_path_buf(),
            uid: uid.to_string(),
        })
    }

    /// Bytes reserved in `dir` by downloads other than `uid`'s.
    pub fn others(&self, dir: &Path, uid: &str) -> u64 {
        self.lock().get(dir).map_or(0, |p| {
            p.iter()
                .filter(|(u, _)| u.as_str() != uid)
                .map(|(_, b)| *b)
                .sum()
        })
    }

    /// Bytes reserved in `dir`.
    #[cfg(test)]
    pub fn reserved(&self, dir: &Path) -> u64 {
        self.lock().get(dir).map_or(0, |p| p.values().sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_downloads_cannot_share_the_same_free_bytes() {
        let r = Arc::new(Reservations::default());
        let dir = Path::new("/pool");
        let available = 100u64;
        let fits = |need: u64| {
            move |others: u64| {
                if need + others <= available {
                    Ok(())
                } else {
                    Err(others)
                }
            }
        };
        let a = r.reserve(dir, "a", 60, fits(60)).unwrap();
        assert_eq!(r.reserve(dir, "b", 60, fits(60)).err(), Some(60));
        // Another pool is separate; the same object re-reserving replaces its own.
        let c = r.reserve(Path::new("/other"), "c", 60, fits(60)).unwrap();
        let a2 = r.reserve(dir, "a", 70, fits(70)).unwrap();
        assert_eq!(r.reserved(dir), 70);
        drop(a2);
        drop(a);
        assert_eq!(r.reserved(dir), 0);
        let b = r.reserve(dir, "b", 60, fits(60)).unwrap();
        assert_eq!(r.reserved(dir), 60);
        assert_eq!(r.others(dir, "b"), 0);
        assert_eq!(r.others(dir, "a"), 60);
        drop((b, c));
        assert_eq!(r.reserved(Path::new("/other")), 0);
    }
}
