//! A fixed-size pool of logged-in PKCS#11 sessions with one operation in flight per session.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cryptoki::context::Pkcs11;
use cryptoki::error::Error as CryptokiError;
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use parking_lot::{Condvar, Mutex};

use crate::error::{ckr_name, from_cryptoki};
use crate::module::find_token;
use crate::{HsmError, Pin, TokenSelector};

/// Module context, token selector and PIN, with which the pool finds its token again and
/// logs in.
pub(crate) struct TokenAccess {
    pub(crate) context: Pkcs11,
    pub(crate) module: PathBuf,
    pub(crate) selector: TokenSelector,
    pub(crate) token_label: String,
    pub(crate) pin: Pin,
}

pub(crate) struct SessionPool {
    access: TokenAccess,
    size: usize,
    wait_timeout: Duration,
    state: Mutex<PoolState>,
    session_returned: Condvar,
    /// C_Login calls the pool has started and finished. Both only grow, and a login is in
    /// progress while they differ.
    logins_started: AtomicU64,
    logins_finished: AtomicU64,
}

struct PoolState {
    slot: Slot,
    idle: Vec<PooledSession>,
    /// Sessions opened for the pool and not yet disposed of, idle or leased.
    open: usize,
    /// Incremented by every recovery. Sessions of older generations are disposed of when
    /// their lease ends.
    generation: u64,
    /// Sessions of generations below this one were closed by the module itself.
    lost_below: u64,
}

struct PooledSession {
    session: Session,
    generation: u64,
}

/// A failed attempt to take a session, with the pool generation it happened in.
pub(crate) struct AcquireError {
    pub(crate) error: HsmError,
    pub(crate) generation: u64,
}

impl SessionPool {
    pub(crate) fn new(access: TokenAccess, slot: Slot, size: usize, wait_timeout: Duration) -> Self {
        SessionPool {
            access,
            size,
            wait_timeout,
            state: Mutex::new(PoolState {
                slot,
                idle: Vec::with_capacity(size),
                open: 0,
                generation: 0,
                lost_below: 0,
            }),
            session_returned: Condvar::new(),
            logins_started: AtomicU64::new(0),
            logins_finished: AtomicU64::new(0),
        }
    }

    pub(crate) fn size(&self) -> usize {
        self.size
    }

    /// Returns the number of C_Login calls started so far if no login is in progress, or
    /// `None` while one is. Comparing it with [`Self::logins_started`] later shows whether
    /// the login state may have changed in between.
    pub(crate) fn login_snapshot(&self) -> Option<u64> {
        // Reading the finished count first makes equal values mean that no login was in
        // progress between the two reads, because a login increments started before finished.
        let finished = self.logins_finished.load(Ordering::SeqCst);
        let started = self.logins_started.load(Ordering::SeqCst);
        (started == finished).then_some(started)
    }

    /// Returns the number of C_Login calls started so far.
    pub(crate) fn logins_started(&self) -> u64 {
        self.logins_started.load(Ordering::SeqCst)
    }

    /// Returns the current generation, which each recovery increments.
    pub(crate) fn generation(&self) -> u64 {
        self.state.lock().generation
    }

    /// Returns the slot the pool currently opens sessions on.
    pub(crate) fn slot(&self) -> Slot {
        self.state.lock().slot
    }

    pub(crate) fn access(&self) -> &TokenAccess {
        &self.access
    }

    /// Takes an idle session, opens a new one while the pool is below its size, or waits up
    /// to the pool's timeout for a session to come back.
    pub(crate) fn acquire(&self) -> Result<Lease<'_>, AcquireError> {
        let deadline = Instant::now() + self.wait_timeout;
        let mut state = self.state.lock();
        loop {
            if let Some(pooled) = state.idle.pop() {
                return Ok(Lease { pool: self, pooled: Some(pooled) });
            }

            if state.open < self.size {
                state.open += 1;
                let slot = state.slot;
                let generation = state.generation;
                drop(state);

                return match self.open_session(slot) {
                    Ok(session) => Ok(Lease { pool: self, pooled: Some(PooledSession { session, generation }) }),
                    Err(error) => {
                        self.state.lock().open -= 1;
                        self.session_returned.notify_one();
                        Err(AcquireError { error, generation })
                    }
                };
            }

            if self.session_returned.wait_until(&mut state, deadline).timed_out() {
                return Err(AcquireError {
                    error: HsmError::PoolTimeout { waited: self.wait_timeout, size: self.size },
                    generation: state.generation,
                });
            }
        }
    }

    /// Opens a read-write session and logs the user in unless the token already has the user
    /// logged in for this process. PKCS#11 login state is shared by all sessions of an
    /// application on a token, so this logs in once per process as long as any session stays
    /// open.
    fn open_session(&self, slot: Slot) -> Result<Session, HsmError> {
        let session = self.access.context.open_rw_session(slot).map_err(from_cryptoki)?;

        let state = session.get_session_info().map_err(from_cryptoki)?.session_state();
        if matches!(state, SessionState::RoUser | SessionState::RwUser) {
            return Ok(session);
        }

        self.logins_started.fetch_add(1, Ordering::SeqCst);
        let login = session.login(UserType::User, Some(&self.access.pin.to_auth_pin()));
        self.logins_finished.fetch_add(1, Ordering::SeqCst);

        match login {
            Ok(()) | Err(CryptokiError::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => Ok(session),
            Err(CryptokiError::Pkcs11(rv, _)) => {
                Err(HsmError::Login { token: self.access.token_label.clone(), code: ckr_name(rv) })
            }
            Err(other) => Err(from_cryptoki(other)),
        }
    }

    /// Discards the pool's sessions after `cause` showed that sessions of `failed_generation`
    /// are unusable, and finds the token's slot again. Sessions are opened anew, and the user
    /// logged in again, by the next `acquire` calls.
    ///
    /// Returns false without doing anything if another thread already recovered from a
    /// failure in that generation.
    pub(crate) fn recover(&self, failed_generation: u64, cause: &HsmError) -> Result<bool, HsmError> {
        let mut state = self.state.lock();
        if state.generation != failed_generation {
            return Ok(false);
        }

        let idle = std::mem::take(&mut state.idle);
        state.open -= idle.len();
        state.generation += 1;
        let lost = cause.sessions_lost();
        if lost {
            state.lost_below = state.generation;
        }
        for pooled in idle {
            dispose(pooled.session, lost);
        }

        let found = find_token(&self.access.context, &self.access.module, &self.access.selector);
        // Waiters may open sessions now, whether or not the token was found.
        self.session_returned.notify_all();
        state.slot = found?.0;
        Ok(true)
    }

    fn give_back(&self, pooled: PooledSession) {
        let mut state = self.state.lock();
        if pooled.generation == state.generation && !std::thread::panicking() {
            state.idle.push(pooled);
            drop(state);
            self.session_returned.notify_one();
            return;
        }

        // The session belongs to a generation that a recovery discarded, or the operation
        // panicked and may have left an operation active on it.
        state.open -= 1;
        let lost = pooled.generation < state.lost_below;
        drop(state);
        self.session_returned.notify_one();
        dispose(pooled.session, lost);
    }
}

/// Ends a discarded session. A session the module reports as closed is forgotten instead of
/// closed, because the module may already have given its handle number to a new session that
/// C_CloseSession would then close. A forgotten session keeps one reference to the module
/// context, which lives until the process exits anyway.
fn dispose(session: Session, lost: bool) {
    if lost {
        std::mem::forget(session);
    } else {
        // Dropping a cryptoki session calls C_CloseSession; cryptoki logs a failure there.
        drop(session);
    }
}

/// A session taken from the pool. Dropping the lease returns the session, also when the
/// operation failed or panicked.
pub(crate) struct Lease<'pool> {
    pool: &'pool SessionPool,
    pooled: Option<PooledSession>,
}

impl Lease<'_> {
    pub(crate) fn session(&self) -> &Session {
        &self.pooled().session
    }

    /// Returns the pool generation the session was opened in.
    pub(crate) fn generation(&self) -> u64 {
        self.pooled().generation
    }

    fn pooled(&self) -> &PooledSession {
        self.pooled.as_ref().expect("a lease keeps its session until it is dropped")
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(pooled) = self.pooled.take() {
            self.pool.give_back(pooled);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::module::{context, init_token};

    const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
    const USER_PIN: &str = "unit-user-pin-2468";

    /// Creates a fresh SoftHSM2 token and returns a pool of `size` sessions on it.
    fn new_pool(name: &str, size: usize, wait_timeout: Duration) -> SessionPool {
        // SoftHSM2 needs its token directory before the module is loaded; this is the one
        // that .cargo/softhsm2-test.conf names.
        std::fs::create_dir_all("/tmp/sigil-test-tokens").expect("token directory");

        let mut random = [0u8; 4];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random)
            .expect("system random number generator");
        let label = format!("unit-{name}-{}", crate::types::hex(&random));
        init_token(Path::new(MODULE), &label, &Pin::new("unit-so-pin-1357".to_owned()), &Pin::new(USER_PIN.to_owned()))
            .expect("token initialization");

        let context = context(Path::new(MODULE)).expect("module loads");
        let selector = TokenSelector::Label(label.clone());
        let (slot, _) = find_token(&context, Path::new(MODULE), &selector).expect("new token");
        let access = TokenAccess {
            context,
            module: MODULE.into(),
            selector,
            token_label: label,
            pin: Pin::new(USER_PIN.to_owned()),
        };
        SessionPool::new(access, slot, size, wait_timeout)
    }

    #[test]
    fn acquire_times_out_when_all_leased() {
        let pool = new_pool("timeout", 1, Duration::from_millis(50));
        let lease = pool.acquire().map_err(|failure| failure.error).expect("first lease");

        let started = Instant::now();
        let error = pool.acquire().map(|_| ()).map_err(|failure| failure.error);
        assert!(matches!(error, Err(HsmError::PoolTimeout { size: 1, .. })), "unexpected result {error:?}");
        assert!(started.elapsed() >= Duration::from_millis(50));

        drop(lease);
        assert!(pool.acquire().is_ok(), "returned session is not reused");
    }

    #[test]
    fn lease_returned_after_panic() {
        let pool = new_pool("panic", 1, Duration::from_millis(200));
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _lease = pool.acquire().map_err(|failure| failure.error).expect("lease");
            panic!("operation panicked");
        }));
        assert!(result.is_err());

        assert_eq!(pool.state.lock().open, 0, "panicked session still counted");
        assert!(pool.acquire().is_ok(), "pool unusable after a panic");
    }

    #[test]
    fn sessions_log_in_once() {
        let pool = new_pool("login", 2, Duration::from_millis(200));
        let first = pool.acquire().map_err(|failure| failure.error).expect("first lease");
        let second = pool.acquire().map_err(|failure| failure.error).expect("second lease");

        for lease in [&first, &second] {
            let state = lease.session().get_session_info().expect("session info").session_state();
            assert_eq!(state, SessionState::RwUser);
        }
    }

    #[test]
    fn recovery_discards_idle_sessions() {
        let pool = new_pool("recover", 2, Duration::from_millis(200));
        let first = pool.acquire().map_err(|failure| failure.error).expect("first lease");
        let second = pool.acquire().map_err(|failure| failure.error).expect("second lease");
        let old_generation = first.generation();
        drop(second);

        let cause = HsmError::NotLoggedIn { token: "unit".to_owned() };
        assert!(pool.recover(old_generation, &cause).expect("recovery"));
        assert!(!pool.recover(old_generation, &cause).expect("second recovery"), "the same generation recovered twice");
        {
            let state = pool.state.lock();
            assert!(state.idle.is_empty());
            assert_eq!(state.open, 1, "only the leased session stays open");
        }

        drop(first);
        assert_eq!(pool.state.lock().open, 0, "old-generation session went back to the pool");

        let fresh = pool.acquire().map_err(|failure| failure.error).expect("new lease");
        assert_eq!(fresh.generation(), old_generation + 1);
    }
}
