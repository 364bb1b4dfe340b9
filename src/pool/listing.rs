//! Listings in pages that cost what the page holds: the IDs of a pool's volumes and
//! snapshots kept in order in memory ([`Index`]), so a page reads only its own
//! entries' metadata ([`walk`]); and one page made of every node's answer ([`merge`]).
//!
//! # Guarantees
//!
//! - The index is built from the names in the pool directory each time the pool is
//!   opened, so after a crash it is what the directory says: the directory stays the
//!   single source of truth.
//! - An ID enters the index before its metadata document is committed and leaves it
//!   only once the document is removed. So the index may name an object that is not
//!   (or no longer) there, which a page skips when it finds no document; it never
//!   lacks one that is there. Two operations on one ID never run at once (the
//!   caller holds the ID's lock), so one cannot take out what the other puts in.
//! - A page of a listing holds the objects at or after its start, in ID order. The
//!   next page starts at the first ID the page did not hold: an object that exists
//!   throughout a listing is listed exactly once, whatever is created or deleted
//!   meanwhile; one created or deleted during it may or may not be.

use std::collections::BTreeSet;
use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use super::Result;
use crate::sys;

/// The IDs of one kind of object in the pool, in order. Clones share the set.
pub(super) struct Index<K> {
    ids: Arc<Mutex<BTreeSet<K>>>,
}

impl<K> Clone for Index<K> {
    fn clone(&self) -> Self {
        Index {
            ids: Arc::clone(&self.ids),
        }
    }
}

impl<K> std::fmt::Debug for Index<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        write!(f, "Index({} IDs)", ids.len())
    }
}

impl<K: Ord + Clone> Index<K> {
    /// The IDs of the metadata documents (`<id>.json`) in `dir`; names that `parse`
    /// refuses are no object of the pool.
    pub(super) fn scan(dir: &Path, parse: impl Fn(&str) -> Option<K>) -> Result<Self> {
        let mut ids = BTreeSet::new();
        for entry in std::fs::read_dir(dir).map_err(|e| sys::Error::io("read_dir", dir, e))? {
            let entry = entry.map_err(|e| sys::Error::io("read_dir", dir, e))?;
            let name = entry.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            match parse(stem) {
                Some(id) => {
                    ids.insert(id);
                }
                None => {
                    tracing::warn!(path = %entry.path().display(), "ignoring a file that names no object")
                }
            }
        }
        Ok(Self::of(ids))
    }

    /// The IDs of [`Index::scan`], or none where `dir` cannot be read (a survey of a
    /// pool that is not mounted).
    pub(super) fn scan_or_empty(dir: &Path, parse: impl Fn(&str) -> Option<K>) -> Self {
        Self::scan(dir, parse).unwrap_or_else(|_| Self::of(BTreeSet::new()))
    }

    fn of(ids: BTreeSet<K>) -> Self {
        Index {
            ids: Arc::new(Mutex::new(ids)),
        }
    }

    /// Before an object's metadata document is committed.
    pub(super) fn insert(&self, id: &K) {
        self.lock().insert(id.clone());
    }

    /// Once an object's metadata document is removed.
    pub(super) fn remove(&self, id: &K) {
        self.lock().remove(id);
    }

    /// At most `n` IDs within `from` onwards, in order.
    fn after(&self, from: Bound<&K>, n: usize) -> Vec<K> {
        self.lock()
            .range((from, Bound::Unbounded))
            .take(n)
            .cloned()
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeSet<K>> {
        self.ids.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The first `limit` objects at or after `from`, in ID order. `read` gives an ID's
/// object, or `None` when there is none to list (its document is gone, or a filter
/// leaves it out): the IDs after it are read in its place. The index is not held
/// while `read` runs.
pub(super) fn walk<K: Ord + Clone, T>(
    index: &Index<K>,
    from: Option<&K>,
    limit: usize,
    mut read: impl FnMut(&K) -> Option<T>,
) -> Vec<T> {
    let mut out = Vec::new();
    let mut last: Option<K> = None;
    while out.len() < limit {
        let bound = match (&last, from) {
            (Some(id), _) => Bound::Excluded(id),
            (None, Some(id)) => Bound::Included(id),
            (None, None) => Bound::Unbounded,
        };
        let ids = index.after(bound, limit - out.len());
        let Some(end) = ids.last().cloned() else {
            break;
        };
        out.extend(ids.iter().filter_map(&mut read));
        last = Some(end);
    }
    out
}

/// One page of a listing over several nodes: the entries at or after `start` in key
/// order, at most `max` of them, and the entry that starts the next page, if any.
/// `answers` holds every node's answer, in any order. Each node need send only its
/// first `max + 1` entries at or after `start`: no entry beyond those can be on this
/// page or start the next. An agent that predates paging sends all it has, which
/// comes to the same page.
pub fn merge<T, K: Ord>(
    answers: Vec<T>,
    key: impl Fn(&T) -> &K,
    start: Option<&K>,
    max: usize,
) -> (Vec<T>, Option<T>) {
    let mut entries: Vec<T> = answers
        .into_iter()
        .filter(|entry| start.is_none_or(|s| key(entry) >= s))
        .collect();
    entries.sort_by(|a, b| key(a).cmp(key(b)));
    let mut rest = entries.into_iter();
    let page: Vec<T> = rest.by_ref().take(max).collect();
    (page, rest.next())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(ids: &[u32]) -> Index<u32> {
        Index::of(ids.iter().copied().collect())
    }

    #[test]
    fn a_walk_reads_only_its_page() {
        let index = index(&[10, 20, 30, 40, 50]);
        let mut read = Vec::new();
        let page = walk(&index, Some(&20), 2, |id| {
            read.push(*id);
            Some(*id)
        });
        assert_eq!(page, vec![20, 30]);
        assert_eq!(read, vec![20, 30]);
        // A start between IDs, and one past the end.
        assert_eq!(
            walk(&index, Some(&25), 10, |id| Some(*id)),
            vec![30, 40, 50]
        );
        assert_eq!(
            walk(&index, Some(&51), 10, |id| Some(*id)),
            Vec::<u32>::new()
        );
        assert_eq!(walk(&index, None, usize::MAX, |id| Some(*id)).len(), 5);
        assert_eq!(walk(&index, None, 0, |id| Some(*id)), Vec::<u32>::new());
    }

    #[test]
    fn a_walk_reads_on_past_what_is_not_there() {
        let index = index(&[1, 2, 3, 4, 5, 6, 7]);
        // 2, 3 and 5 have no document (deleted, or never committed) or are filtered out.
        let page = walk(&index, None, 3, |id| {
            (![2, 3, 5].contains(id)).then_some(*id)
        });
        assert_eq!(page, vec![1, 4, 6]);
        let all = walk(&index, Some(&2), 100, |id| (id % 2 == 0).then_some(*id));
        assert_eq!(all, vec![2, 4, 6]);
        assert_eq!(walk(&index, None, 3, |_| None::<u32>), Vec::<u32>::new());
    }

    #[test]
    fn the_index_follows_inserts_and_removes() {
        let index = index(&[]);
        for id in [3, 1, 2] {
            index.insert(&id);
        }
        index.insert(&2);
        index.remove(&1);
        index.remove(&9);
        assert_eq!(walk(&index, None, 10, |id| Some(*id)), vec![2, 3]);
        assert_eq!(format!("{index:?}"), "Index(2 IDs)");
    }

    #[test]
    fn the_index_is_the_directory_s_metadata_names() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "b.json",
            "a.json",
            "a.img",
            "c.json.tmp",
            "X.json",
            "c.img.partial",
        ] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let index = Index::scan(dir.path(), |s| {
            s.bytes()
                .all(|b| b.is_ascii_lowercase())
                .then(|| s.to_owned())
        })
        .unwrap();
        assert_eq!(walk(&index, None, 10, |id| Some(id.clone())), ["a", "b"]);
    }

    #[test]
    fn a_merged_page_is_the_smallest_keys_from_the_start() {
        // Two nodes, each answering its first max + 1 = 3 entries at or after 3.
        let answers = vec![3, 5, 7, 4, 6, 8];
        assert_eq!(merge(answers, |x| x, Some(&3), 2), (vec![3, 4], Some(5)));
        // The last page.
        assert_eq!(merge(vec![9, 8], |x| x, Some(&8), 2), (vec![8, 9], None));
        // No limit.
        assert_eq!(
            merge(vec![2, 1, 3], |x| x, None, usize::MAX),
            (vec![1, 2, 3], None)
        );
        assert_eq!(merge(Vec::<u32>::new(), |x| x, None, 5), (vec![], None));
    }

    #[test]
    fn a_merged_page_takes_whole_answers_from_agents_that_predate_paging() {
        // The second node sends everything, unsorted, including entries before the
        // start: the page is the same as from two paging nodes.
        let old = vec![9, 1, 6, 2];
        let new = vec![5, 7, 11];
        let merged = merge([new.clone(), old.clone()].concat(), |x| x, Some(&5), 2);
        assert_eq!(merged, (vec![5, 6], Some(7)));
        assert_eq!(
            merge([old, new].concat(), |x| x, Some(&5), 10),
            (vec![5, 6, 7, 9, 11], None)
        );
    }

    #[test]
    fn paging_lists_what_exists_throughout_exactly_once() {
        // A listing two at a time while, between pages, one ID is deleted (the next
        // page's start among them) and others are created before and after the cursor.
        let index = index(&[10, 20, 30, 40, 50, 60]);
        let page = |start: Option<&u32>| {
            let answer = walk(&index, start, 3, |id| Some(*id));
            merge(answer, |x| x, start, 2)
        };
        let (first, next) = page(None);
        assert_eq!((first.clone(), next), (vec![10, 20], Some(30)));
        index.remove(&30);
        index.insert(&15);
        index.insert(&35);
        let (second, next) = page(next.as_ref());
        assert_eq!((second.clone(), next), (vec![35, 40], Some(50)));
        index.remove(&40);
        let (third, next) = page(next.as_ref());
        assert_eq!((third.clone(), next), (vec![50, 60], None));
        let listed: Vec<u32> = [first, second, third].concat();
        for throughout in [10, 20, 50, 60] {
            assert_eq!(listed.iter().filter(|x| **x == throughout).count(), 1);
        }
    }
}
