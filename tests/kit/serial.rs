//! Which tests may overlap. The e2e binary runs its tests on parallel threads (`--test-threads`, the number
//! of cores by default) where cargo used to run one suite's binary after another. Most tests only share the
//! machine; a few must run alone: they load it so that others' timings break, hold most of this process's
//! file descriptors, or change what the whole process sees (its umask). Those call [`alone`]; every fixture
//! (an agent, a test database, a Redis prefix) holds a [`Share`], so no test that uses one runs meanwhile.
//!
//! Make fixtures on the test's own thread: a thread of the test that waited for its share while an `alone`
//! test waits for the test to end would never get it.

use std::cell::{Cell, RefCell};
use std::marker::PhantomData;
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

static TURNS: RwLock<()> = RwLock::new(());

thread_local! {
    /// The shares this thread's fixtures hold, and the one read guard they hold together (a second read
    /// while a writer waits would block on the thread's own first one).
    static SHARES: RefCell<(usize, Option<RwLockReadGuard<'static, ()>>)> = const { RefCell::new((0, None)) };
    /// This thread holds [`alone`]: its fixtures need no share.
    static ALONE: Cell<bool> = const { Cell::new(false) };
}

/// While held, no fixture of another test exists (nor is made).
pub struct Alone {
    _guard: RwLockWriteGuard<'static, ()>,
}

/// Waits until no other test holds a fixture, then keeps them out until dropped.
pub fn alone() -> Alone {
    let guard = TURNS.write().unwrap_or_else(PoisonError::into_inner);
    ALONE.set(true);
    Alone { _guard: guard }
}

impl Drop for Alone {
    fn drop(&mut self) {
        ALONE.set(false);
    }
}

/// A fixture's part of the lock: fixtures of any number of tests at once, none while a test runs [`alone`].
/// Dropped on the thread that made it.
pub struct Share {
    counted: bool,
    _thread_bound: PhantomData<std::sync::MutexGuard<'static, ()>>,
}

/// A share for a fixture made on this thread.
pub fn share() -> Share {
    let counted = !ALONE.get();
    if counted {
        SHARES.with_borrow_mut(|(count, guard)| {
            if *count == 0 {
                *guard = Some(TURNS.read().unwrap_or_else(PoisonError::into_inner));
            }
            *count += 1;
        });
    }
    Share { counted, _thread_bound: PhantomData }
}

impl Drop for Share {
    fn drop(&mut self) {
        if self.counted {
            SHARES.with_borrow_mut(|(count, guard)| {
                *count -= 1;
                if *count == 0 {
                    *guard = None;
                }
            });
        }
    }
}
