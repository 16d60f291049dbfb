//! Fetching a deployment's source on the agent: a git clone (libgit2, no submodules) or a
//! gzip-compressed tarball, extracted entry by entry after each entry is validated.
//!
//! Everything here blocks; the caller runs it in `tokio::task::spawn_blocking`. On error the
//! caller deletes the destination directory; nothing is ever written outside it.

use std::cell::Cell;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use git2::build::{CheckoutBuilder, RepoBuilder};
use git2::{Cred, CredentialType, ErrorClass, ErrorCode, FetchOptions, Oid, ProxyOptions, RemoteCallbacks};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("invalid git URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("unsupported scheme {scheme:?} in the git URL {url}: use https://, http:// or git://")]
    UnsupportedScheme { url: String, scheme: String },
    #[error(
        "SSH git URLs are not supported ({url}): the agent has no SSH keys. Use the repository's https:// URL, \
         with GIT_USERNAME and GIT_PASSWORD in the service's secrets if it is private"
    )]
    SshNotSupported { url: String },
    #[error("local repositories are not allowed ({url}): this agent's operator has not enabled file:// sources")]
    LocalNotAllowed { url: String },
    #[error(
        "the git URL {url} contains credentials: remove them from the URL and put them in the service's \
         secrets as GIT_USERNAME and GIT_PASSWORD"
    )]
    CredentialsInUrl { url: String },
    #[error("invalid branch name {branch:?}")]
    InvalidBranch { branch: String },
    #[error("branch {branch:?} does not exist in {url}")]
    BranchNotFound { branch: String, url: String },
    #[error("commit {commit:?} is not a commit sha: expected 4 to 40 hexadecimal digits")]
    InvalidCommit { commit: String },
    #[error("commit {commit:?} is ambiguous in {url}: give more digits of the sha")]
    AmbiguousCommit { commit: String, url: String },
    #[error("commit {commit:?} is not in branch {branch:?} of {url}")]
    CommitNotFound { commit: String, branch: String, url: String },
    #[error(
        "{url} asks for credentials: put GIT_USERNAME and GIT_PASSWORD (a password or an access token) \
         in the service's secrets"
    )]
    AuthRequired { url: String },
    #[error("{url} refused the credentials of user {username:?}: check GIT_USERNAME and GIT_PASSWORD in the service's secrets")]
    AuthFailed { url: String, username: String },
    #[error("no git repository at {url} ({detail})")]
    RepositoryNotFound { url: String, detail: String },
    #[error("the TLS certificate of {url} was rejected: {message}")]
    Certificate { url: String, message: String },
    #[error("could not fetch {url}: {message}")]
    Network { url: String, message: String },
    #[error("git failed on {url}: {message}")]
    Git { url: String, message: String },
    #[error("the checkout directory {} already exists and is not empty", path.display())]
    DestNotEmpty { path: PathBuf },
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the archive is not a gzip-compressed tar (it does not start with the gzip signature)")]
    NotGzip,
    #[error("the archive is corrupt {context}: {message}")]
    CorruptArchive { context: String, message: String },
    #[error("reading the archive failed {context}: {source}")]
    ReadArchive {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("refusing archive entry {entry:?}: {reason}")]
    UnsafeEntry { entry: String, reason: String },
    #[error("archive entry {entry:?} is {size} bytes, over the limit of {limit} bytes per file")]
    EntryTooLarge { entry: String, size: u64, limit: u64 },
    #[error("the archive's files add up to more than {limit} bytes (the limit was reached at entry {entry:?})")]
    ArchiveTooLarge { entry: String, limit: u64 },
    #[error("the archive has more than {limit} entries (the limit was reached at entry {entry:?})")]
    TooManyEntries { entry: String, limit: u64 },
    #[error("Dockerfile path {path:?}: {reason}")]
    InvalidDockerfile { path: String, reason: String },
    #[error("no Dockerfile at {path:?} in the source")]
    DockerfileNotFound { path: String },
}

impl SourceError {
    /// True only for transient causes (the network, an I/O error on this host): trying again
    /// may work. A user's mistake or a hostile archive fails the same way every time.
    pub fn retryable(&self) -> bool {
        matches!(self, SourceError::Network { .. } | SourceError::Io { .. } | SourceError::ReadArchive { .. })
    }
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> SourceError + '_ {
    move |source| SourceError::Io { path: path.to_path_buf(), source }
}

// ---------------------------------------------------------------------------------------------
// git

pub struct GitSource<'a> {
    pub url: &'a str,
    /// Default: the remote's HEAD.
    pub branch: Option<&'a str>,
    /// A full or abbreviated sha to check out after fetching the branch; must be reachable from it.
    pub commit: Option<&'a str>,
    /// Credentials for https (from the service's secrets). A password alone is sent with the
    /// user name `git`, which hosts that take an access token as the password accept.
    pub username: Option<&'a str>,
    pub password: Option<&'a str>,
    /// file:// URLs and plain local paths, only when the operator allows them.
    pub allow_file: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    /// Full sha checked out.
    pub commit: String,
    /// First line of its message.
    pub summary: String,
}

/// How the credentials callback ended; libgit2 calls it again after each refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Auth {
    NotAsked,
    Offered,
    /// Asked, and the service has no credentials.
    Missing,
    /// Asked again after the credentials were offered: they were refused.
    Refused,
    /// The server wants a kind of credentials other than a user name and password.
    Unsupported,
}

const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Clones into `dest` (which must not exist yet or be empty), checks out the commit, no
/// submodules. `log` receives human-readable progress lines, never credentials.
pub fn fetch_git(src: &GitSource, dest: &Path, log: &mut dyn FnMut(String)) -> Result<Fetched, SourceError> {
    check_git_url(src.url, src.allow_file)?;
    let url = redact_url(src.url);
    if let Some(branch) = src.branch {
        if branch.starts_with('-') || !git2::Reference::is_valid_name(&format!("refs/heads/{branch}")) {
            return Err(SourceError::InvalidBranch { branch: branch.into() });
        }
    }
    if let Some(commit) = src.commit {
        if !(4..=40).contains(&commit.len()) || !commit.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(SourceError::InvalidCommit { commit: commit.into() });
        }
    }
    ensure_empty_dir(dest)?;
    let local = is_local_url(src.url);
    if let Some(path) = local_path(src.url) {
        if !Path::new(path).is_dir() {
            return Err(SourceError::RepositoryNotFound { url, detail: "no such directory on this host".into() });
        }
    }
    let credentials = match (src.username, src.password) {
        (None, None) => None,
        (username, password) => Some((username.unwrap_or("git"), password.unwrap_or(""))),
    };
    // libgit2's local transport cannot make a shallow clone, and a commit may be deep in history.
    let shallow = src.commit.is_none() && !local;

    let branch_note = match src.branch {
        Some(branch) => format!("branch {branch}"),
        None => "default branch".into(),
    };
    log(format!("cloning {url} ({branch_note}{})", if shallow { ", latest commit only" } else { "" }));
    if credentials.is_some() && src.url.to_ascii_lowercase().starts_with("http://") {
        log("warning: GIT_USERNAME and GIT_PASSWORD are sent unencrypted over http://".into());
    }

    let auth = Cell::new(Auth::NotAsked);
    let received = Cell::new((0usize, 0usize));
    let cloned = {
        let mut callbacks = RemoteCallbacks::new();
        callbacks.credentials(|_url, _username_from_url, allowed| {
            if !allowed.contains(CredentialType::USER_PASS_PLAINTEXT) {
                auth.set(Auth::Unsupported);
                return Err(git2::Error::from_str(
                    "the server asks for credentials other than a user name and password",
                ));
            }
            match (credentials, auth.get()) {
                (None, _) => {
                    auth.set(Auth::Missing);
                    Err(git2::Error::from_str("the repository asks for credentials and none were given"))
                }
                (Some((username, password)), Auth::NotAsked) => {
                    auth.set(Auth::Offered);
                    Cred::userpass_plaintext(username, password)
                }
                (Some(_), _) => {
                    // Offered once already: returning an error stops libgit2 from asking forever.
                    auth.set(Auth::Refused);
                    Err(git2::Error::from_str("the credentials were refused"))
                }
            }
        });
        let progress_log = &mut *log;
        let received = &received;
        let mut last_report = Instant::now();
        callbacks.transfer_progress(move |progress| {
            received.set((progress.received_objects(), progress.received_bytes()));
            if last_report.elapsed() >= PROGRESS_EVERY && progress.received_objects() < progress.total_objects() {
                last_report = Instant::now();
                progress_log(format!(
                    "received {}/{} objects ({})",
                    progress.received_objects(),
                    progress.total_objects(),
                    human_bytes(progress.received_bytes() as u64)
                ));
            }
            true
        });
        let mut proxy = ProxyOptions::new();
        proxy.auto();
        let mut fetch = FetchOptions::new();
        fetch.remote_callbacks(callbacks).proxy_options(proxy);
        if shallow {
            fetch.depth(1);
        }
        let mut builder = RepoBuilder::new();
        builder.fetch_options(fetch);
        if let Some(branch) = src.branch {
            builder.branch(branch);
        }
        builder.clone(src.url, dest)
    };
    let repo = cloned.map_err(|e| classify_git_error(&e, src, &url, auth.get()))?;
    let git_error = |e: git2::Error| SourceError::Git { url: url.clone(), message: e.message().to_string() };

    let (objects, bytes) = received.get();
    if objects > 0 {
        log(format!("received {objects} objects ({})", human_bytes(bytes as u64)));
    }
    let head = repo.head().map_err(git_error)?;
    let branch = head.shorthand().unwrap_or("HEAD").to_string();
    let tip = head.peel_to_commit().map_err(git_error)?;
    let commit = match src.commit {
        None => tip,
        Some(wanted) => {
            let not_found =
                || SourceError::CommitNotFound { commit: wanted.into(), branch: branch.clone(), url: url.clone() };
            let found = if wanted.len() == 40 {
                Oid::from_str(wanted).and_then(|oid| repo.find_commit(oid))
            } else {
                repo.find_commit_by_prefix(wanted)
            };
            let commit = match found {
                Ok(commit) => commit,
                Err(e) if e.code() == ErrorCode::Ambiguous => {
                    return Err(SourceError::AmbiguousCommit { commit: wanted.into(), url: url.clone() })
                }
                Err(e) if matches!(e.code(), ErrorCode::NotFound | ErrorCode::InvalidSpec) => return Err(not_found()),
                Err(e) => return Err(git_error(e)),
            };
            // The clone fetched every branch: the commit must be in the one that was asked for.
            if commit.id() != tip.id() && !repo.graph_descendant_of(tip.id(), commit.id()).map_err(git_error)? {
                return Err(not_found());
            }
            if commit.id() != tip.id() {
                repo.checkout_tree(commit.as_object(), Some(CheckoutBuilder::new().force())).map_err(git_error)?;
                repo.set_head_detached(commit.id()).map_err(git_error)?;
            }
            commit
        }
    };
    let sha = commit.id().to_string();
    let message = commit.message_bytes();
    let first_line = message.split(|&b| b == b'\n').find(|line| !line.trim_ascii().is_empty()).unwrap_or_default();
    let summary = String::from_utf8_lossy(first_line.trim_ascii()).into_owned();
    log(format!("checked out {} {summary}", &sha[..7]));
    Ok(Fetched { commit: sha, summary })
}

fn classify_git_error(e: &git2::Error, src: &GitSource, url: &str, auth: Auth) -> SourceError {
    let url = url.to_string();
    let message = e.message().to_string();
    let username = || src.username.unwrap_or("git").to_string();
    match auth {
        Auth::Missing | Auth::Unsupported => return SourceError::AuthRequired { url },
        Auth::Refused => return SourceError::AuthFailed { url, username: username() },
        Auth::NotAsked | Auth::Offered => {}
    }
    if e.code() == ErrorCode::Auth {
        return match auth {
            Auth::Offered => SourceError::AuthFailed { url, username: username() },
            _ => SourceError::AuthRequired { url },
        };
    }
    if let Some(branch) = src.branch {
        // libgit2 looks the branch up among the fetched remote-tracking references.
        if e.code() == ErrorCode::NotFound && message.contains(&format!("origin/{branch}")) {
            return SourceError::BranchNotFound { branch: branch.into(), url };
        }
    }
    if e.code() == ErrorCode::Certificate {
        return SourceError::Certificate { url, message };
    }
    if let Some(status) = http_status(&message) {
        return match status {
            401 | 403 if auth == Auth::Offered => SourceError::AuthFailed { url, username: username() },
            401 | 403 => SourceError::AuthRequired { url },
            404 => SourceError::RepositoryNotFound { url, detail: "the server answered 404 Not Found".into() },
            408 | 429 | 500..=599 => SourceError::Network { url, message },
            _ => SourceError::Git { url, message },
        };
    }
    if e.code() == ErrorCode::Timeout
        || matches!(e.class(), ErrorClass::Net | ErrorClass::Os | ErrorClass::Ssl | ErrorClass::Zlib)
    {
        return SourceError::Network { url, message };
    }
    SourceError::Git { url, message }
}

/// The status in libgit2's "unexpected http status code: 404".
fn http_status(message: &str) -> Option<u16> {
    let (_, rest) = message.split_once("http status code: ")?;
    rest.get(..3)?.parse().ok()
}

fn ensure_empty_dir(dest: &Path) -> Result<(), SourceError> {
    match fs::read_dir(dest) {
        Ok(mut entries) => match entries.next() {
            None => Ok(()),
            Some(_) => Err(SourceError::DestNotEmpty { path: dest.to_path_buf() }),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error(dest)(e)),
    }
}

fn human_bytes(bytes: u64) -> String {
    if bytes < 1024 * 1024 {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
    }
}

fn is_local_url(url: &str) -> bool {
    url.starts_with('/') || url.get(..7).is_some_and(|s| s.eq_ignore_ascii_case("file://"))
}

/// The directory a local URL names, when it is plain enough to check (no percent-escapes).
fn local_path(url: &str) -> Option<&str> {
    let path = if url.starts_with('/') {
        url
    } else if is_local_url(url) {
        let rest = &url[7..];
        rest.strip_prefix("localhost").unwrap_or(rest)
    } else {
        return None;
    };
    (!path.contains('%')).then_some(path)
}

/// The URL with any `user:password@` replaced by `***@`, for messages and logs.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***{}", &rest[at..]),
        None => url.to_string(),
    }
}

/// Checks a git URL before anything is committed: https, http and git are allowed; file (and
/// plain absolute paths) only with `allow_file`; ssh and scp-like `user@host:path` never, since
/// the agent has no SSH keys; credentials never in the URL (they belong in the service's secrets).
pub fn check_git_url(url: &str, allow_file: bool) -> Result<(), SourceError> {
    let invalid = |reason: &str| SourceError::InvalidUrl { url: redact_url(url), reason: reason.into() };
    if url.is_empty() {
        return Err(invalid("the URL is empty"));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid("it contains spaces or control characters"));
    }
    if let Some((scheme, rest)) = url.split_once("://") {
        let well_formed = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
        if !well_formed {
            return Err(invalid("expected a URL like https://HOST/OWNER/REPO"));
        }
        return match scheme.to_ascii_lowercase().as_str() {
            "https" | "http" | "git" => check_network_url(url, rest),
            "file" if !allow_file => Err(SourceError::LocalNotAllowed { url: url.into() }),
            "file" => match rest.strip_prefix("localhost").unwrap_or(rest) {
                path if path.starts_with('/') && path.len() > 1 => Ok(()),
                _ => Err(invalid("a file URL must name an absolute path: file:///PATH")),
            },
            "ssh" | "git+ssh" | "ssh+git" => Err(SourceError::SshNotSupported { url: redact_url(url) }),
            other => Err(SourceError::UnsupportedScheme { url: redact_url(url), scheme: other.into() }),
        };
    }
    if url.starts_with('/') {
        return if allow_file { Ok(()) } else { Err(SourceError::LocalNotAllowed { url: url.into() }) };
    }
    if is_scp_like(url) {
        return Err(SourceError::SshNotSupported { url: url.into() });
    }
    Err(invalid("expected a URL like https://HOST/OWNER/REPO"))
}

fn check_network_url(url: &str, rest: &str) -> Result<(), SourceError> {
    let invalid = |reason: &str| SourceError::InvalidUrl { url: url.into(), reason: reason.into() };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    if authority.contains('@') {
        return Err(SourceError::CredentialsInUrl { url: redact_url(url) });
    }
    let port = match authority.strip_prefix('[') {
        Some(v6) => {
            let (host, after) = v6.split_once(']').ok_or_else(|| invalid("unterminated IPv6 address"))?;
            if host.is_empty() || !host.chars().all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.') {
                return Err(invalid("invalid IPv6 address"));
            }
            match after {
                "" => None,
                _ => Some(after.strip_prefix(':').ok_or_else(|| invalid("invalid port"))?),
            }
        }
        None => {
            let (host, port) = match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            };
            if host.is_empty() {
                return Err(invalid("it has no host name"));
            }
            if !host.chars().all(|c| c.is_ascii_alphanumeric() || "-._".contains(c)) {
                return Err(invalid("invalid host name"));
            }
            port
        }
    };
    if let Some(port) = port {
        if port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(invalid("invalid port"));
        }
    }
    if !path.starts_with('/') || path.trim_matches('/').is_empty() {
        return Err(invalid("it names no repository (expected https://HOST/OWNER/REPO)"));
    }
    Ok(())
}

/// `[user@]host:path`, git's short form of an SSH URL.
fn is_scp_like(url: &str) -> bool {
    let Some((before, after)) = url.split_once(':') else { return false };
    let host = before.rsplit('@').next().unwrap_or(before);
    !host.is_empty()
        && !before.contains('/')
        && !after.is_empty()
        && !after.starts_with(':')
        && host.chars().all(|c| c.is_ascii_alphanumeric() || "-._[]".contains(c))
}

// ---------------------------------------------------------------------------------------------
// tarballs

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_total_bytes: u64,
    pub max_file_bytes: u64,
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_total_bytes: 512 << 20, max_file_bytes: 256 << 20, max_entries: 100_000 }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExtractStats {
    /// Regular files and hard links written.
    pub files: u64,
    /// Bytes of file content written.
    pub bytes: u64,
}

/// Bytes the tar reader may consume between two entries (headers, long names, pax records,
/// skipped data): it holds long names and pax records in memory, so a gzip bomb posing as one
/// must not get far.
const METADATA_BUDGET: u64 = 1 << 20;
const MAX_NAME_BYTES: usize = 4096;
const MAX_COMPONENT_BYTES: usize = 255;

/// Counts what the tar reader takes from the decompressed stream, and refuses to hand out
/// more than the open window allows.
struct Metered<R> {
    inner: R,
    meter: Rc<Meter>,
}

#[derive(Default)]
struct Meter {
    read: Cell<u64>,
    window_end: Cell<u64>,
    exceeded: Cell<bool>,
}

impl Meter {
    fn open_window(&self, bytes: u64) {
        self.window_end.set(self.read.get().saturating_add(bytes));
    }
}

impl<R: Read> Read for Metered<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let allowed = self.meter.window_end.get().saturating_sub(self.meter.read.get());
        if allowed == 0 {
            self.meter.exceeded.set(true);
            return Err(io::Error::other("over the archive metadata budget"));
        }
        let len = buf.len().min(usize::try_from(allowed).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..len])?;
        self.meter.read.set(self.meter.read.get() + n as u64);
        Ok(n)
    }
}

/// Extracts a gzip-compressed tarball into `dest` (created if missing), writing each entry
/// itself after validating it; see the module's tests for what is refused. Regular files get
/// mode 0644 or 0755 (only the executable bit is kept), directories 0755; ownership and times
/// are not restored. Paths are kept as they are (a single top-level directory is not stripped).
pub fn extract_tar_gz(reader: impl Read, dest: &Path, limits: &Limits) -> Result<ExtractStats, SourceError> {
    let mut reader = reader;
    let mut magic = [0u8; 2];
    let mut got = 0;
    while got < magic.len() {
        match reader.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => return Err(SourceError::ReadArchive { context: "at its start".into(), source }),
        }
    }
    if magic[..got] != [0x1f, 0x8b] {
        return Err(SourceError::NotGzip);
    }
    fs::create_dir_all(dest).map_err(io_error(dest))?;

    let meter = Rc::new(Meter::default());
    let gz = flate2::read::MultiGzDecoder::new(io::Cursor::new(magic).chain(reader));
    let mut archive = tar::Archive::new(Metered { inner: gz, meter: meter.clone() });
    let read_error = |source: io::Error, context: String| {
        if meter.exceeded.get() {
            return SourceError::CorruptArchive {
                context,
                message: format!("more than {METADATA_BUDGET} bytes of headers between two entries"),
            };
        }
        match source.kind() {
            io::ErrorKind::InvalidData
            | io::ErrorKind::InvalidInput
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::Other => SourceError::CorruptArchive { context, message: source.to_string() },
            _ => SourceError::ReadArchive { context, source },
        }
    };
    let mut entries = archive.entries().map_err(|e| read_error(e, "at its start".into()))?;
    let mut stats = ExtractStats::default();
    let mut count = 0u64;
    let mut previous: Option<String> = None;
    loop {
        meter.open_window(METADATA_BUDGET);
        let context = match &previous {
            Some(name) => format!("after entry {name:?}"),
            None => "at its start".into(),
        };
        let mut entry = match entries.next() {
            None => break,
            Some(Ok(entry)) => entry,
            Some(Err(e)) => return Err(read_error(e, context)),
        };
        // The entry's own data is bounded by the limits checked below.
        meter.open_window(u64::MAX);
        let raw_name = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw_name).into_owned();
        let refuse = |reason: &str| unsafe_entry(&name, reason);
        count += 1;
        if count > limits.max_entries {
            return Err(SourceError::TooManyEntries { entry: name.clone(), limit: limits.max_entries });
        }
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            // Archive-wide comments, such as the commit id GitHub puts first.
            previous = Some(name);
            continue;
        }
        let parts = entry_parts(&raw_name).map_err(refuse)?;
        let Some((leaf, parents)) = parts.split_last() else {
            if kind.is_dir() {
                previous = Some(name);
                continue; // "./": the root itself
            }
            return Err(refuse("the name is empty"));
        };
        match kind {
            tar::EntryType::Directory => {
                make_dirs(dest, &parts, &name)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let claimed = entry.size();
                if claimed > limits.max_file_bytes {
                    let limit = limits.max_file_bytes;
                    return Err(SourceError::EntryTooLarge { entry: name.clone(), size: claimed, limit });
                }
                if stats.bytes.saturating_add(claimed) > limits.max_total_bytes {
                    return Err(SourceError::ArchiveTooLarge { entry: name.clone(), limit: limits.max_total_bytes });
                }
                let executable = entry.header().mode().is_ok_and(|mode| mode & 0o111 != 0);
                let path = make_dirs(dest, parents, &name)?.join(leaf);
                clear_leaf(&path, &name)?;
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(io_error(&path))?;
                let mut written = 0u64;
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match entry.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(read_error(e, format!("at entry {name:?}"))),
                    };
                    written += n as u64;
                    // Count what is really read, whatever the header claimed.
                    if written > limits.max_file_bytes {
                        let limit = limits.max_file_bytes;
                        return Err(SourceError::EntryTooLarge { entry: name.clone(), size: written, limit });
                    }
                    if stats.bytes + written > limits.max_total_bytes {
                        return Err(SourceError::ArchiveTooLarge {
                            entry: name.clone(),
                            limit: limits.max_total_bytes,
                        });
                    }
                    file.write_all(&buf[..n]).map_err(io_error(&path))?;
                }
                if written != claimed {
                    return Err(SourceError::CorruptArchive {
                        context: format!("at entry {name:?}"),
                        message: format!("the archive ends after {written} of the entry's {claimed} bytes"),
                    });
                }
                let mode = if executable { 0o755 } else { 0o644 };
                file.set_permissions(fs::Permissions::from_mode(mode)).map_err(io_error(&path))?;
                stats.files += 1;
                stats.bytes += written;
            }
            tar::EntryType::Symlink => {
                let target = link_target(&entry, &name)?;
                if target.starts_with('/') {
                    return Err(refuse(&format!("it is a symbolic link to the absolute path {target:?}")));
                }
                let dir = make_dirs(dest, parents, &name)?;
                check_symlink_target(dest, parents, &target, &name)?;
                let path = dir.join(leaf);
                clear_leaf(&path, &name)?;
                std::os::unix::fs::symlink(&target, &path).map_err(io_error(&path))?;
            }
            tar::EntryType::Link => {
                let target = link_target(&entry, &name)?;
                if target.starts_with('/') {
                    return Err(refuse(&format!("it is a hard link to the absolute path {target:?}")));
                }
                let target_parts = entry_parts(target.as_bytes())
                    .map_err(|reason| refuse(&format!("it is a hard link to {target:?}, and {reason}")))?;
                if target_parts == parts {
                    return Err(refuse("it is a hard link to itself"));
                }
                let source = existing_file(dest, &target_parts).ok_or_else(|| {
                    refuse(&format!("it is a hard link to {target:?}, which is not a regular file extracted before it"))
                })?;
                let path = make_dirs(dest, parents, &name)?.join(leaf);
                clear_leaf(&path, &name)?;
                fs::hard_link(&source, &path).map_err(io_error(&path))?;
                stats.files += 1;
            }
            tar::EntryType::Char => return Err(refuse("character device entries are not allowed")),
            tar::EntryType::Block => return Err(refuse("block device entries are not allowed")),
            tar::EntryType::Fifo => return Err(refuse("FIFO entries are not allowed")),
            other => {
                return Err(refuse(&format!("unsupported entry type {:?}", char::from(other.as_byte()))));
            }
        }
        previous = Some(name);
    }
    Ok(stats)
}

fn unsafe_entry(entry: &str, reason: &str) -> SourceError {
    SourceError::UnsafeEntry { entry: entry.into(), reason: reason.into() }
}

/// The normal components of an entry's name, or why the name is refused.
fn entry_parts(raw: &[u8]) -> Result<Vec<String>, &'static str> {
    if raw.contains(&0) {
        return Err("the name contains a NUL byte");
    }
    let name = std::str::from_utf8(raw).map_err(|_| "the name is not valid UTF-8")?;
    if name.starts_with('/') {
        return Err("the path is absolute");
    }
    if name.len() > MAX_NAME_BYTES {
        return Err("the name is too long");
    }
    let mut parts = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err("the path has a `..` component"),
            _ if part.len() > MAX_COMPONENT_BYTES => return Err("a component of the path is too long"),
            _ => parts.push(part.to_string()),
        }
    }
    Ok(parts)
}

fn link_target<R: Read>(entry: &tar::Entry<'_, R>, name: &str) -> Result<String, SourceError> {
    let refuse = |reason: &str| unsafe_entry(name, reason);
    let raw = entry.link_name_bytes().ok_or_else(|| refuse("the link has no target"))?;
    if raw.is_empty() {
        return Err(refuse("the link has no target"));
    }
    if raw.contains(&0) {
        return Err(refuse("the link target contains a NUL byte"));
    }
    let target = std::str::from_utf8(&raw).map_err(|_| refuse("the link target is not valid UTF-8"))?;
    if target.len() > MAX_NAME_BYTES {
        return Err(refuse("the link target is too long"));
    }
    Ok(target.to_string())
}

/// Creates `dest/parts…` as real directories (0755) where missing, and refuses to go through
/// anything else: writing through a symbolic link is how archives escape their root.
fn make_dirs(dest: &Path, parts: &[String], entry: &str) -> Result<PathBuf, SourceError> {
    let mut path = dest.to_path_buf();
    for (i, part) in parts.iter().enumerate() {
        path.push(part);
        let refuse = |what: &str| SourceError::UnsafeEntry {
            entry: entry.into(),
            reason: format!("{:?} {what}", parts[..=i].join("/")),
        };
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => {}
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(refuse("is a symbolic link: the archive may not write through it"))
            }
            Ok(_) => return Err(refuse("is a file extracted before, not a directory")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::DirBuilder::new().mode(0o755).create(&path).map_err(io_error(&path))?;
                // The umask may have taken bits away.
                fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).map_err(io_error(&path))?;
            }
            Err(e) => return Err(io_error(&path)(e)),
        }
    }
    Ok(path)
}

/// Removes what an earlier entry put at `path` (a later entry of the same name wins, as with
/// tar), except a directory. Files are then created anew, so no write ever follows a link.
fn clear_leaf(path: &Path, entry: &str) -> Result<(), SourceError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => Err(SourceError::UnsafeEntry {
            entry: entry.into(),
            reason: "a directory of the same name was extracted before it".into(),
        }),
        Ok(_) => fs::remove_file(path).map_err(io_error(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error(path)(e)),
    }
}

/// Refuses a symbolic link whose target, resolved from the link's own directory, leaves the
/// root. Going up (`..`) is only followed through directories already extracted (real ones,
/// never replaced later), so the lexical answer is the one the kernel will give; going down
/// through other links is safe because each of them was checked the same way.
fn check_symlink_target(dest: &Path, link_dir: &[String], target: &str, entry: &str) -> Result<(), SourceError> {
    let refuse = |reason: String| SourceError::UnsafeEntry { entry: entry.into(), reason };
    let mut at: Vec<&str> = link_dir.iter().map(String::as_str).collect();
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if at.is_empty() {
                    return Err(refuse(format!(
                        "it is a symbolic link to {target:?}, which points outside the archive"
                    )));
                }
                let dir = dest.join(at.join("/"));
                if !fs::symlink_metadata(&dir).is_ok_and(|meta| meta.is_dir()) {
                    return Err(refuse(format!(
                        "it is a symbolic link to {target:?}, which goes up from {:?}, not a directory extracted before it",
                        at.join("/")
                    )));
                }
                at.pop();
            }
            name => at.push(name),
        }
    }
    Ok(())
}

/// `dest/parts…` if it is a regular file reached through real directories only.
fn existing_file(dest: &Path, parts: &[String]) -> Option<PathBuf> {
    let (leaf, parents) = parts.split_last()?;
    let mut path = dest.to_path_buf();
    for part in parents {
        path.push(part);
        if !fs::symlink_metadata(&path).ok()?.is_dir() {
            return None;
        }
    }
    path.push(leaf);
    fs::symlink_metadata(&path).ok()?.is_file().then_some(path)
}

// ---------------------------------------------------------------------------------------------
// Dockerfile

/// Resolves the Dockerfile path of a service inside a source tree: relative, never leaving the
/// tree (`..`, or a symbolic link pointing outside), and a regular file. Returns the path of
/// the file itself relative to the root (symbolic links resolved, forward slashes), so the
/// builder reads exactly what was checked.
pub fn dockerfile_in(root: &Path, dockerfile: &str) -> Result<String, SourceError> {
    let invalid = |reason: &str| SourceError::InvalidDockerfile { path: dockerfile.into(), reason: reason.into() };
    if dockerfile.is_empty() {
        return Err(invalid("the path is empty"));
    }
    if dockerfile.contains('\0') {
        return Err(invalid("the path contains a NUL byte"));
    }
    if dockerfile.starts_with('/') {
        return Err(invalid("it must be relative to the root of the source, not an absolute path"));
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in dockerfile.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(invalid("it goes outside the source (..)"));
                }
            }
            name => parts.push(name),
        }
    }
    if parts.is_empty() {
        return Err(invalid("it names the root of the source, not a file"));
    }
    let root = fs::canonicalize(root).map_err(io_error(root))?;
    let real = match fs::canonicalize(root.join(parts.join("/"))) {
        Ok(real) => real,
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => {
            return Err(SourceError::DockerfileNotFound { path: dockerfile.into() })
        }
        Err(e) => return Err(invalid(&format!("it cannot be resolved: {e}"))),
    };
    let relative =
        real.strip_prefix(&root).map_err(|_| invalid("it is a symbolic link that points outside the source"))?;
    let meta = fs::metadata(&real).map_err(io_error(&real))?;
    if !meta.is_file() {
        return Err(invalid("it is not a regular file"));
    }
    let parts: Option<Vec<&str>> = relative.iter().map(|part| part.to_str()).collect();
    match parts {
        Some(parts) if !parts.is_empty() => Ok(parts.join("/")),
        _ => Err(invalid("it resolves to a path that is not valid UTF-8")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::thread::JoinHandle;

    use flate2::write::GzEncoder;
    use tempfile::TempDir;

    // ---- git -----------------------------------------------------------------------------

    /// `program` (git or one of its parts) with no user or system configuration.
    fn git_command(program: &Path, dir: &Path) -> Command {
        let mut command = Command::new(program);
        command
            .current_dir(dir)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_AUTHOR_NAME", "Test")
            .env("GIT_AUTHOR_EMAIL", "test@example.com")
            .env("GIT_COMMITTER_NAME", "Test")
            .env("GIT_COMMITTER_EMAIL", "test@example.com");
        command
    }

    fn git(dir: &Path, args: &[&str]) -> String {
        let out = git_command(Path::new("git"), dir).args(args).output().expect("run git");
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// A repository made with the git command line: main has three commits, `other` branches
    /// off after the second.
    struct Upstream {
        dir: TempDir,
        first: String,
        main: String,
        other: String,
    }

    impl Upstream {
        fn path(&self) -> PathBuf {
            self.dir.path().join("repo")
        }

        fn url(&self) -> String {
            format!("file://{}", self.path().display())
        }
    }

    fn upstream() -> Upstream {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        fs::create_dir(&repo).unwrap();
        git(&repo, &["init", "--quiet", "--initial-branch=main"]);
        fs::write(repo.join("Dockerfile"), "FROM scratch\n").unwrap();
        git(&repo, &["add", "."]);
        git(&repo, &["commit", "--quiet", "-m", "Initial commit\nsecond line of the subject\n\nWith a body."]);
        let first = git(&repo, &["rev-parse", "HEAD"]);
        fs::write(repo.join("app.txt"), "v1\n").unwrap();
        git(&repo, &["add", "."]);
        git(&repo, &["commit", "--quiet", "-m", "Add the app"]);
        git(&repo, &["branch", "other"]);
        fs::write(repo.join("app.txt"), "v2\n").unwrap();
        git(&repo, &["commit", "--quiet", "-am", "Fix the thing"]);
        let main = git(&repo, &["rev-parse", "HEAD"]);
        git(&repo, &["checkout", "--quiet", "other"]);
        fs::write(repo.join("other.txt"), "other\n").unwrap();
        git(&repo, &["add", "."]);
        git(&repo, &["commit", "--quiet", "-m", "Other work"]);
        let other = git(&repo, &["rev-parse", "HEAD"]);
        git(&repo, &["checkout", "--quiet", "main"]);
        Upstream { dir, first, main, other }
    }

    fn source(url: &str) -> GitSource<'_> {
        GitSource { url, branch: None, commit: None, username: None, password: None, allow_file: true }
    }

    /// Clones into a fresh directory; returns the result, the checkout and the log lines.
    fn fetch(src: &GitSource) -> (Result<Fetched, SourceError>, TempDir, Vec<String>) {
        let out = tempfile::tempdir().unwrap();
        let mut lines = Vec::new();
        let result = fetch_git(src, &out.path().join("src"), &mut |line| lines.push(line));
        (result, out, lines)
    }

    fn read(path: PathBuf) -> String {
        fs::read_to_string(path).unwrap()
    }

    #[test]
    fn clones_a_branch_over_file_urls() {
        let up = upstream();
        let url = up.url();
        let (fetched, out, lines) = fetch(&GitSource { branch: Some("main"), ..source(&url) });
        let fetched = fetched.unwrap();
        assert_eq!(fetched, Fetched { commit: up.main.clone(), summary: "Fix the thing".into() });
        let dest = out.path().join("src");
        assert_eq!(read(dest.join("app.txt")), "v2\n");
        assert!(!dest.join("other.txt").exists());
        assert_eq!(lines.first().unwrap(), &format!("cloning {url} (branch main)"));
        assert_eq!(lines.last().unwrap(), &format!("checked out {} Fix the thing", &up.main[..7]));

        let (fetched, out, _) = fetch(&GitSource { branch: Some("other"), ..source(&url) });
        assert_eq!(fetched.unwrap(), Fetched { commit: up.other.clone(), summary: "Other work".into() });
        assert_eq!(read(out.path().join("src/other.txt")), "other\n");
        assert_eq!(read(out.path().join("src/app.txt")), "v1\n");
    }

    #[test]
    fn clones_the_default_branch_and_plain_paths() {
        let up = upstream();
        let path = up.path().display().to_string();
        let (fetched, _out, lines) = fetch(&source(&path));
        assert_eq!(fetched.unwrap().commit, up.main);
        assert_eq!(lines[0], format!("cloning {path} (default branch)"));
    }

    #[test]
    fn checks_out_a_commit_of_the_branch() {
        let up = upstream();
        let url = up.url();
        let (fetched, out, lines) =
            fetch(&GitSource { branch: Some("main"), commit: Some(&up.first[..7]), ..source(&url) });
        assert_eq!(fetched.unwrap(), Fetched { commit: up.first.clone(), summary: "Initial commit".into() });
        let dest = out.path().join("src");
        assert!(dest.join("Dockerfile").is_file());
        assert!(!dest.join("app.txt").exists(), "files of later commits are gone");
        let repo = git2::Repository::open(&dest).unwrap();
        assert_eq!(repo.head().unwrap().target().unwrap().to_string(), up.first);
        assert!(repo.head_detached().unwrap());
        assert_eq!(lines.last().unwrap(), &format!("checked out {} Initial commit", &up.first[..7]));

        // A full sha, and the default branch.
        let (fetched, _out, _) = fetch(&GitSource { commit: Some(&up.first), ..source(&url) });
        assert_eq!(fetched.unwrap().commit, up.first);
    }

    #[test]
    fn an_unknown_branch_or_commit_is_a_clear_user_error() {
        let up = upstream();
        let url = up.url();
        let (result, _out, _) = fetch(&GitSource { branch: Some("nope"), ..source(&url) });
        let err = result.unwrap_err();
        assert_eq!(err.to_string(), format!("branch \"nope\" does not exist in {url}"));
        assert!(!err.retryable());

        let (result, _out, _) = fetch(&GitSource { branch: Some("main"), commit: Some("abc1234"), ..source(&url) });
        let err = result.unwrap_err();
        assert_eq!(err.to_string(), format!("commit \"abc1234\" is not in branch \"main\" of {url}"));
        assert!(!err.retryable());

        // In the repository, but in another branch.
        let (result, _out, _) = fetch(&GitSource { commit: Some(&up.other), ..source(&url) });
        let err = result.unwrap_err();
        assert_eq!(err.to_string(), format!("commit {:?} is not in branch \"main\" of {url}", up.other));

        let (result, _out, _) = fetch(&GitSource { commit: Some("HEAD~1"), ..source(&url) });
        assert!(matches!(result, Err(SourceError::InvalidCommit { .. })), "{result:?}");
        let (result, _out, _) = fetch(&GitSource { branch: Some("--upload-pack=x"), ..source(&url) });
        assert!(matches!(result, Err(SourceError::InvalidBranch { .. })), "{result:?}");

        let missing = format!("file://{}/nothing-here", up.dir.path().display());
        let (result, _out, _) = fetch(&source(&missing));
        let err = result.unwrap_err();
        assert!(matches!(err, SourceError::RepositoryNotFound { .. }), "{err:?}");
        assert!(!err.retryable());
    }

    #[test]
    fn local_sources_need_the_operators_permission() {
        let up = upstream();
        let url = up.url();
        let path = up.path().display().to_string();
        for url in [url.as_str(), path.as_str()] {
            let (result, out, _) = fetch(&GitSource { allow_file: false, ..source(url) });
            let err = result.unwrap_err();
            assert!(matches!(err, SourceError::LocalNotAllowed { .. }), "{err:?}");
            assert!(err.to_string().contains("not enabled file://"), "{err}");
            assert!(!err.retryable());
            assert!(!out.path().join("src").exists(), "nothing was cloned");
        }
    }

    #[test]
    fn refuses_a_destination_that_is_not_empty() {
        let up = upstream();
        let url = up.url();
        let out = tempfile::tempdir().unwrap();
        fs::write(out.path().join("stray"), "x").unwrap();
        let err = fetch_git(&source(&url), out.path(), &mut |_| {}).unwrap_err();
        assert!(matches!(err, SourceError::DestNotEmpty { .. }), "{err:?}");
    }

    /// `git daemon`, killed when dropped.
    struct Daemon(Child);

    impl Drop for Daemon {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    fn wait_for_port(port: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "git daemon did not listen on port {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn clones_over_the_git_protocol() {
        let up = upstream();
        let port = free_port();
        let base = up.dir.path().display().to_string();
        // Run git-daemon itself: `git daemon` would fork it, and killing `git` would leave it.
        let daemon = PathBuf::from(git(up.dir.path(), &["--exec-path"])).join("git-daemon");
        if !daemon.is_file() {
            println!("skipping: `git daemon` is unavailable (no {})", daemon.display());
            return;
        }
        let _daemon = Daemon(
            git_command(&daemon, up.dir.path())
                .args(["--export-all", "--reuseaddr", "--listen=127.0.0.1"])
                .arg(format!("--base-path={base}"))
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start git-daemon"),
        );
        wait_for_port(port);
        let url = format!("git://127.0.0.1:{port}/repo");

        let (fetched, out, lines) = fetch(&GitSource { branch: Some("main"), allow_file: false, ..source(&url) });
        assert_eq!(fetched.unwrap().commit, up.main, "{lines:?}");
        assert_eq!(lines[0], format!("cloning {url} (branch main, latest commit only)"));
        assert!(lines.iter().any(|line| line.starts_with("received ")), "{lines:?}");
        let repo = git2::Repository::open(out.path().join("src")).unwrap();
        assert!(repo.is_shallow(), "a branch alone is fetched shallow");

        let (fetched, out, _) =
            fetch(&GitSource { branch: Some("other"), commit: Some(&up.first), allow_file: false, ..source(&url) });
        assert_eq!(fetched.unwrap().commit, up.first);
        assert!(!git2::Repository::open(out.path().join("src")).unwrap().is_shallow());

        let (result, _out, _) = fetch(&GitSource { branch: Some("nope"), allow_file: false, ..source(&url) });
        assert_eq!(result.unwrap_err().to_string(), format!("branch \"nope\" does not exist in {url}"));
    }

    /// An HTTP server that answers every request 401 and keeps the requests' headers.
    struct Unauthorized {
        port: u16,
        requests: Arc<Mutex<Vec<String>>>,
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    impl Unauthorized {
        fn start() -> Unauthorized {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            let requests = Arc::new(Mutex::new(Vec::new()));
            let stop = Arc::new(AtomicBool::new(false));
            let thread = std::thread::spawn({
                let requests = requests.clone();
                let stop = stop.clone();
                move || {
                    for stream in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let Ok(mut stream) = stream else { continue };
                        let mut request = Vec::new();
                        let mut buf = [0u8; 4096];
                        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                            match stream.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => request.extend_from_slice(&buf[..n]),
                            }
                        }
                        requests.lock().unwrap().push(String::from_utf8_lossy(&request).into_owned());
                        let _ = stream.write_all(
                            b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"git\"\r\n\
                              Content-Length: 0\r\nConnection: close\r\n\r\n",
                        );
                    }
                }
            });
            Unauthorized { port, requests, stop, thread: Some(thread) }
        }
    }

    impl Drop for Unauthorized {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            let _ = TcpStream::connect(("127.0.0.1", self.port)); // wakes the accept loop
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }

    #[test]
    fn credentials_are_offered_once_and_never_logged() {
        let server = Unauthorized::start();
        let url = format!("http://127.0.0.1:{}/owner/repo.git", server.port);

        let (result, _out, _) = fetch(&GitSource { allow_file: false, ..source(&url) });
        let err = result.unwrap_err();
        assert!(matches!(err, SourceError::AuthRequired { .. }), "{err:?}");
        assert!(err.to_string().contains("GIT_USERNAME and GIT_PASSWORD"), "{err}");
        assert!(!err.retryable());

        server.requests.lock().unwrap().clear();
        let (result, _out, lines) =
            fetch(&GitSource { username: Some("user"), password: Some("secret"), allow_file: false, ..source(&url) });
        let err = result.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{url} refused the credentials of user \"user\": check GIT_USERNAME and GIT_PASSWORD in the service's secrets")
        );
        assert!(!err.retryable());
        let requests = server.requests.lock().unwrap().clone();
        assert_eq!(requests.len(), 2, "one try without credentials, one with, then stop: {requests:?}");
        // base64("user:secret")
        assert!(requests[1].contains("Authorization: Basic dXNlcjpzZWNyZXQ="), "{}", requests[1]);
        assert!(lines.iter().all(|line| !line.contains("secret")), "{lines:?}");
        assert!(lines.iter().any(|line| line.contains("unencrypted")), "{lines:?}");
    }

    #[test]
    fn an_unreachable_server_is_retryable() {
        let url = format!("http://127.0.0.1:{}/owner/repo.git", free_port());
        let (result, _out, _) = fetch(&GitSource { allow_file: false, ..source(&url) });
        let err = result.unwrap_err();
        assert!(matches!(err, SourceError::Network { .. }), "{err:?}");
        assert!(err.retryable());
        assert!(err.to_string().starts_with(&format!("could not fetch {url}: ")), "{err}");
    }

    #[test]
    fn checks_git_urls() {
        for ok in [
            "https://github.com/owner/repo.git",
            "https://github.com/owner/repo",
            "HTTPS://git.example.com:8443/group/sub/repo.git",
            "http://10.0.0.5/repo.git",
            "http://[::1]:8080/repo.git",
            "git://git.example.com/repo.git",
        ] {
            assert!(check_git_url(ok, false).is_ok(), "{ok}: {:?}", check_git_url(ok, false));
        }
        assert!(check_git_url("file:///srv/git/repo.git", true).is_ok());
        assert!(check_git_url("/srv/git/repo.git", true).is_ok());

        let err = check_git_url("ssh://git@github.com/owner/repo.git", false).unwrap_err();
        assert!(matches!(err, SourceError::SshNotSupported { .. }), "{err:?}");
        assert!(err.to_string().contains("the agent has no SSH keys"), "{err}");
        let err = check_git_url("git@github.com:owner/repo.git", true).unwrap_err();
        assert!(matches!(err, SourceError::SshNotSupported { .. }), "{err:?}");
        assert!(matches!(check_git_url("github.com:owner/repo", false), Err(SourceError::SshNotSupported { .. })));

        let err = check_git_url("ftp://example.com/repo.git", true).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unsupported scheme \"ftp\" in the git URL ftp://example.com/repo.git: use https://, http:// or git://"
        );
        assert!(!err.retryable());

        let err = check_git_url("file:///srv/git/repo.git", false).unwrap_err();
        assert!(matches!(err, SourceError::LocalNotAllowed { .. }), "{err:?}");

        let err = check_git_url("https://bob:hunter2@github.com/owner/repo.git", false).unwrap_err();
        assert!(matches!(err, SourceError::CredentialsInUrl { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains("GIT_USERNAME and GIT_PASSWORD"), "{message}");
        assert!(message.contains("https://***@github.com/owner/repo.git"), "{message}");
        assert!(
            !message.contains("hunter2") && !message.contains("bob"),
            "the message repeats no credentials: {message}"
        );
        assert!(matches!(
            check_git_url("https://token@github.com/owner/repo.git", false),
            Err(SourceError::CredentialsInUrl { .. })
        ));

        for garbage in [
            "",
            "not a url",
            "github.com/owner/repo",
            "https://",
            "https:///repo.git",
            "https://github.com",
            "https://github.com/",
            "https://exa mple.com/repo",
            "https://example.com:99999/repo",
            "https://exa%6dple.com/repo",
            "1https://example.com/repo",
            "ext::sh -c touch% /tmp/pwned",
            "ext::sh",
            "relative/path",
            "file://",
            "https://example.com/repo\n",
        ] {
            let err = check_git_url(garbage, true).unwrap_err();
            assert!(matches!(err, SourceError::InvalidUrl { .. }), "{garbage:?}: {err:?}");
        }
    }

    // ---- tarballs ------------------------------------------------------------------------

    struct Tarball(tar::Builder<Vec<u8>>);

    impl Tarball {
        fn new() -> Tarball {
            Tarball(tar::Builder::new(Vec::new()))
        }

        /// An entry written header field by header field, so hostile names get through.
        fn raw(mut self, name: &[u8], kind: tar::EntryType, link: &[u8], mode: u32, data: &[u8]) -> Tarball {
            let mut header = tar::Header::new_gnu();
            let gnu = header.as_gnu_mut().unwrap();
            gnu.name[..name.len()].copy_from_slice(name);
            gnu.linkname[..link.len()].copy_from_slice(link);
            header.set_entry_type(kind);
            header.set_mode(mode);
            header.set_size(data.len() as u64);
            header.set_cksum();
            self.0.append(&header, data).unwrap();
            self
        }

        fn file(self, name: &str, data: &str) -> Tarball {
            self.raw(name.as_bytes(), tar::EntryType::Regular, b"", 0o644, data.as_bytes())
        }

        fn dir(self, name: &str) -> Tarball {
            self.raw(name.as_bytes(), tar::EntryType::Directory, b"", 0o755, b"")
        }

        fn symlink(self, name: &str, target: &str) -> Tarball {
            self.raw(name.as_bytes(), tar::EntryType::Symlink, target.as_bytes(), 0o777, b"")
        }

        fn hard_link(self, name: &str, target: &str) -> Tarball {
            self.raw(name.as_bytes(), tar::EntryType::Link, target.as_bytes(), 0o644, b"")
        }

        fn tar(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }

        fn gz(self) -> Vec<u8> {
            gzip(&self.tar())
        }
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    /// Extracts into `tmp/outer/dest`, expects a refusal, and checks nothing was written
    /// beside `dest` (deep enough that `a/../../x` would land in `tmp`).
    fn refused(tarball: &[u8], limits: &Limits) -> SourceError {
        let tmp = tempfile::tempdir().unwrap();
        let outer = tmp.path().join("outer");
        fs::create_dir(&outer).unwrap();
        let dest = outer.join("dest");
        let err = extract_tar_gz(tarball, &dest, limits).unwrap_err();
        assert_eq!(names(tmp.path()), ["outer"], "{err}");
        assert!(names(&outer).iter().all(|name| name == "dest"), "{err}: {:?}", names(&outer));
        assert!(!err.retryable(), "{err}");
        err
    }

    fn refused_entry(tarball: &[u8], entry: &str) -> SourceError {
        let err = refused(tarball, &Limits::default());
        assert!(err.to_string().contains(&format!("entry {entry:?}")), "the message names {entry:?}: {err}");
        err
    }

    #[test]
    fn extracts_a_normal_tree() {
        let long_name = format!("app/{}/file.txt", "long-directory-name".repeat(8));
        let mut tarball = Tarball::new()
            // GitHub archives start with the commit id in a pax global header.
            .raw(
                b"pax_global_header",
                tar::EntryType::XGlobalHeader,
                b"",
                0o666,
                b"52 comment=0123456789012345678901234567890123456789\n",
            )
            .dir("app/")
            .dir("app/src/")
            .file("app/README.md", "hello\n")
            .raw(b"app/run.sh", tar::EntryType::Regular, b"", 0o6775, b"#!/bin/sh\n")
            .file("app/src/main.rs", "fn main() {}\n")
            .file("app/deep/er/file.txt", "implicit parents\n")
            .symlink("app/link", "src/main.rs")
            .symlink("app/src/up", "../README.md")
            .hard_link("app/hard", "app/README.md")
            .file("app/replaced", "first\n")
            .file("app/replaced", "second\n");
        let mut header = tar::Header::new_gnu();
        header.set_size(5);
        header.set_mode(0o600);
        tarball.0.append_data(&mut header, &long_name, &b"long\n"[..]).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("dest");
        let stats = extract_tar_gz(&tarball.gz()[..], &dest, &Limits::default()).unwrap();

        assert_eq!(names(&dest), ["app"], "the top-level directory is kept");
        let app = dest.join("app");
        assert_eq!(read(app.join("README.md")), "hello\n");
        assert_eq!(read(app.join("src/main.rs")), "fn main() {}\n");
        assert_eq!(read(app.join("deep/er/file.txt")), "implicit parents\n");
        assert_eq!(read(app.join("replaced")), "second\n");
        assert_eq!(read(dest.join(&long_name)), "long\n");
        assert_eq!(mode(&app.join("README.md")), 0o644);
        assert_eq!(mode(&app.join("run.sh")), 0o755, "executable kept, setuid and setgid dropped");
        assert_eq!(mode(&dest.join(&long_name)), 0o644);
        for dir in ["app", "app/src", "app/deep", "app/deep/er"] {
            assert_eq!(mode(&dest.join(dir)), 0o755, "{dir}");
        }
        assert_eq!(fs::read_link(app.join("link")).unwrap(), Path::new("src/main.rs"));
        assert_eq!(read(app.join("link")), "fn main() {}\n");
        assert_eq!(read(app.join("src/up")), "hello\n");
        assert_eq!(read(app.join("hard")), "hello\n");
        assert!(!dest.join("pax_global_header").exists());
        let bytes = [6, 10, 13, 17, 6, 7, 5].iter().sum::<u64>();
        assert_eq!(stats, ExtractStats { files: 8, bytes });
    }

    #[test]
    fn refuses_paths_that_leave_the_root() {
        let err = refused_entry(&Tarball::new().file("ok", "x").file("/etc/x", "x").gz(), "/etc/x");
        assert!(err.to_string().contains("absolute"), "{err}");
        let err = refused_entry(&Tarball::new().file("../x", "x").gz(), "../x");
        assert!(err.to_string().contains("`..`"), "{err}");
        refused_entry(&Tarball::new().file("a/../../x", "x").gz(), "a/../../x");
        refused_entry(&Tarball::new().dir("a/../../d/").gz(), "a/../../d/");
    }

    #[test]
    fn refuses_symbolic_links_that_leave_the_root() {
        let err = refused_entry(&Tarball::new().symlink("passwd", "/etc/passwd").gz(), "passwd");
        assert!(err.to_string().contains("absolute path \"/etc/passwd\""), "{err}");
        refused_entry(&Tarball::new().symlink("up", "../outside").gz(), "up");
        refused_entry(&Tarball::new().dir("d/").symlink("d/up", "../../outside").gz(), "d/up");
        refused_entry(&Tarball::new().symlink("x", "a/../..").gz(), "x");

        // a -> .. leaves the root by itself; a/x is never reached.
        let err = refused_entry(&Tarball::new().symlink("a", "..").file("a/x", "x").gz(), "a");
        assert!(err.to_string().contains("outside the archive"), "{err}");

        // d/e/a -> ../.. is the root, so x -> d/e/a/.. is lexically d/e but really the root's
        // parent: going up through a link is refused.
        let tarball = Tarball::new().dir("d/e/").symlink("d/e/a", "../..").symlink("x", "d/e/a/..").gz();
        let err = refused_entry(&tarball, "x");
        assert!(err.to_string().contains("goes up from \"d/e/a\""), "{err}");
    }

    #[test]
    fn refuses_to_write_through_symbolic_links() {
        // d/a -> .. stays inside, but nothing may be written through it.
        let tarball = Tarball::new().dir("d/").symlink("d/a", "..").file("d/a/x", "x").gz();
        let err = refused_entry(&tarball, "d/a/x");
        assert!(err.to_string().contains("\"d/a\" is a symbolic link"), "{err}");

        let tarball = Tarball::new().dir("sub/").symlink("a", "sub").dir("a/b/").gz();
        refused_entry(&tarball, "a/b/");

        // A later entry replaces a link instead of writing through it.
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("dest");
        let tarball = Tarball::new().file("target", "keep\n").symlink("a", "target").file("a", "new\n").gz();
        extract_tar_gz(&tarball[..], &dest, &Limits::default()).unwrap();
        assert_eq!(read(dest.join("target")), "keep\n");
        assert_eq!(read(dest.join("a")), "new\n");
        assert!(!fs::symlink_metadata(dest.join("a")).unwrap().file_type().is_symlink());
    }

    #[test]
    fn refuses_hard_links_outside_and_special_files() {
        let err = refused_entry(&Tarball::new().hard_link("passwd", "/etc/passwd").gz(), "passwd");
        assert!(err.to_string().contains("hard link to the absolute path"), "{err}");
        refused_entry(&Tarball::new().hard_link("x", "../outside").gz(), "x");
        refused_entry(&Tarball::new().hard_link("x", "not-yet").gz(), "x");
        let err = refused_entry(&Tarball::new().raw(b"tty", tar::EntryType::Char, b"", 0o666, b"").gz(), "tty");
        assert!(err.to_string().contains("character device"), "{err}");
        refused_entry(&Tarball::new().raw(b"disk", tar::EntryType::Block, b"", 0o666, b"").gz(), "disk");
        refused_entry(&Tarball::new().raw(b"pipe", tar::EntryType::Fifo, b"", 0o666, b"").gz(), "pipe");
    }

    #[test]
    fn refuses_bad_names() {
        let err = refused(
            &Tarball::new().raw(b"bad\xff", tar::EntryType::Regular, b"", 0o644, b"x").gz(),
            &Limits::default(),
        );
        assert!(err.to_string().contains("not valid UTF-8"), "{err}");
        assert!(err.to_string().contains("bad"), "{err}");

        // A pax record can carry a NUL that a header field cannot.
        let tarball = Tarball::new()
            .raw(b"PaxHeader", tar::EntryType::XHeader, b"", 0o644, b"12 path=a\0b\n")
            .file("placeholder", "x")
            .gz();
        let err = refused_entry(&tarball, "a\0b");
        assert!(err.to_string().contains("NUL"), "{err}");
    }

    #[test]
    fn enforces_the_limits() {
        let limits = Limits { max_total_bytes: 1000, max_file_bytes: 300, max_entries: 10 };
        let err = refused(&Tarball::new().file("small", "x").file("big", &"x".repeat(301)).gz(), &limits);
        assert_eq!(err.to_string(), "archive entry \"big\" is 301 bytes, over the limit of 300 bytes per file");

        let mut tarball = Tarball::new();
        for i in 0..8 {
            tarball = tarball.file(&format!("f{i}"), &"x".repeat(200));
        }
        let err = refused(&tarball.gz(), &limits);
        assert_eq!(
            err.to_string(),
            "the archive's files add up to more than 1000 bytes (the limit was reached at entry \"f5\")"
        );

        let mut tarball = Tarball::new();
        for i in 0..12 {
            tarball = tarball.file(&format!("f{i}"), "x");
        }
        let err = refused(&tarball.gz(), &limits);
        assert_eq!(err.to_string(), "the archive has more than 10 entries (the limit was reached at entry \"f10\")");
    }

    #[test]
    fn refuses_what_is_not_a_gzip_compressed_tar() {
        let err = refused(&Tarball::new().file("a", "x").tar(), &Limits::default());
        assert!(err.to_string().contains("not a gzip-compressed tar"), "{err}");
        assert!(matches!(refused(b"", &Limits::default()), SourceError::NotGzip));

        let err = refused(&gzip(&[b'z'; 2048]), &Limits::default());
        assert!(matches!(err, SourceError::CorruptArchive { .. }), "{err:?}");

        // Truncated in the middle of a file.
        let mut tar = Tarball::new().file("whole", "x").file("cut", &"y".repeat(1000)).tar();
        tar.truncate(512 * 3 + 100);
        let err = refused(&gzip(&tar), &Limits::default());
        assert!(matches!(err, SourceError::CorruptArchive { .. }), "{err:?}");
        assert!(err.to_string().contains("entry \"cut\""), "{err}");

        // A long name of 2 MiB is a decompression bomb, not a name.
        let tarball = Tarball::new()
            .raw(b"././@LongLink", tar::EntryType::GNULongName, b"", 0o644, &vec![b'a'; 2 << 20])
            .file("x", "x")
            .gz();
        let err = refused(&tarball, &Limits::default());
        assert!(err.to_string().contains("bytes of headers"), "{err}");
    }

    // ---- Dockerfile ----------------------------------------------------------------------

    #[test]
    fn finds_the_dockerfile_inside_the_source() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        fs::create_dir_all(root.join("docker")).unwrap();
        fs::create_dir_all(root.join("dir")).unwrap();
        fs::write(root.join("Dockerfile"), "FROM scratch\n").unwrap();
        fs::write(root.join("docker/Dockerfile.prod"), "FROM scratch\n").unwrap();
        fs::write(tmp.path().join("Dockerfile"), "FROM outside\n").unwrap();
        std::os::unix::fs::symlink("docker/Dockerfile.prod", root.join("inside")).unwrap();
        std::os::unix::fs::symlink("../Dockerfile", root.join("outside")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("passwd")).unwrap();

        assert_eq!(dockerfile_in(&root, "Dockerfile").unwrap(), "Dockerfile");
        assert_eq!(dockerfile_in(&root, "./docker//Dockerfile.prod").unwrap(), "docker/Dockerfile.prod");
        assert_eq!(dockerfile_in(&root, "docker/../Dockerfile").unwrap(), "Dockerfile");
        assert_eq!(dockerfile_in(&root, "inside").unwrap(), "docker/Dockerfile.prod");

        let cases = [
            ("../Dockerfile", "Dockerfile path \"../Dockerfile\": it goes outside the source (..)"),
            (
                "/etc/passwd",
                "Dockerfile path \"/etc/passwd\": it must be relative to the root of the source, not an absolute path",
            ),
            ("missing/Dockerfile", "no Dockerfile at \"missing/Dockerfile\" in the source"),
            ("Dockerfile/x", "no Dockerfile at \"Dockerfile/x\" in the source"),
            ("outside", "Dockerfile path \"outside\": it is a symbolic link that points outside the source"),
            ("passwd", "Dockerfile path \"passwd\": it is a symbolic link that points outside the source"),
            ("dir", "Dockerfile path \"dir\": it is not a regular file"),
            (".", "Dockerfile path \".\": it names the root of the source, not a file"),
            ("", "Dockerfile path \"\": the path is empty"),
        ];
        for (path, message) in cases {
            let err = dockerfile_in(&root, path).unwrap_err();
            assert_eq!(err.to_string(), message);
            assert!(!err.retryable());
        }
    }
}
