//! The one wasmtime engine of a process: compiles plug-ins once (cached on disk
//! by content hash), checks their contract version, and drives epoch deadlines.

use super::bindings::{StagePre, StoreState};
use sha2::{Digest, Sha256};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, OptLevel};

/// The contract this host implements (`wit/plugin.wit`).
pub const CONTRACT_PACKAGE: &str = "iotdr:plugin";
pub const CONTRACT_VERSION: &str = "0.1.0";

/// How often the epoch advances; stage timeouts are counted in these ticks.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: cannot read the plug-in: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a valid WebAssembly component: {message}")]
    Compile { path: PathBuf, message: String },
    #[error(
        "{path}: built for {CONTRACT_PACKAGE}@{found}, but this host implements {CONTRACT_PACKAGE}@{CONTRACT_VERSION}; \
         rebuild the plug-in against wit/ of this iotdr version (an incompatible major version)"
    )]
    IncompatibleVersion { path: PathBuf, found: String },
    #[error("{path}: not an iotdr plug-in: it imports no `{CONTRACT_PACKAGE}` interface")]
    NotAPlugin { path: PathBuf },
    #[error("{path}: {message}")]
    Link { path: PathBuf, message: String },
}

/// A compiled plug-in, ready to instantiate cheaply.
pub struct Plugin {
    pub path: PathBuf,
    /// SHA-256 of the component's bytes.
    pub digest: String,
    pub(super) pre: StagePre<StoreState>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin").field("path", &self.path).field("digest", &self.digest).finish()
    }
}

pub struct PluginEngine {
    engine: Engine,
    linker: Linker<StoreState>,
    cache_dir: Option<PathBuf>,
}

impl PluginEngine {
    /// `cache_dir`: where compiled plug-ins are kept; `None` compiles every time.
    pub fn new(cache_dir: Option<PathBuf>) -> wasmtime::Result<PluginEngine> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        // Component-model async bookkeeping costs 25-30 % on this contract's
        // method-heavy calls and the contract has no async functions.
        config.concurrency_support(false);
        config.cranelift_opt_level(OptLevel::Speed);
        let engine = Engine::new(&config)?;

        let mut linker = Linker::new(&engine);
        // Rust's std makes every guest import wasi:cli and wasi:io. They are
        // linked against a context that grants nothing: no files, no
        // environment, no sockets; stdout and stderr go nowhere.
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        super::bindings::Stage::add_to_linker::<_, wasmtime::component::HasSelf<StoreState>>(&mut linker, |s| s)?;

        spawn_epoch_ticker(&engine);
        Ok(PluginEngine { engine, linker, cache_dir })
    }

    /// The default cache: `$XDG_CACHE_HOME/iotdr/plugins` or `~/.cache/iotdr/plugins`.
    pub fn default_cache_dir() -> Option<PathBuf> {
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
        Some(base.join("iotdr").join("plugins"))
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn load(&self, path: &Path) -> Result<Plugin, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read { path: path.to_path_buf(), source })?;
        let digest = hex(&Sha256::digest(&bytes));
        let component = self.compile_cached(path, &bytes, &digest)?;
        check_contract_version(&self.engine, &component, path)?;
        let instance_pre = self.linker.instantiate_pre(&component).map_err(|e| LoadError::Link {
            path: path.to_path_buf(),
            message: format!("cannot link its imports: {e}"),
        })?;
        let pre = StagePre::new(instance_pre).map_err(|e| LoadError::Link {
            path: path.to_path_buf(),
            message: format!("does not export the iotdr `stage` world (init, process): {e}"),
        })?;
        Ok(Plugin { path: path.to_path_buf(), digest, pre })
    }

    fn compile_cached(&self, path: &Path, bytes: &[u8], digest: &str) -> Result<Component, LoadError> {
        let compile_error =
            |e: wasmtime::Error| LoadError::Compile { path: path.to_path_buf(), message: format!("{e}") };
        let Some(dir) = &self.cache_dir else {
            return Component::new(&self.engine, bytes).map_err(compile_error);
        };
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut hasher);
        let cached = dir.join(format!("{digest}-{:016x}.cwasm", hasher.finish()));
        if cached.exists() {
            // SAFETY: the file is one this process family wrote below the
            // user's own cache directory, keyed by the source's hash and the
            // engine's settings; wasmtime also refuses an incompatible one.
            match unsafe { Component::deserialize_file(&self.engine, &cached) } {
                Ok(component) => return Ok(component),
                Err(e) => tracing::warn!(cache = %cached.display(), "ignoring unusable compiled plug-in: {e}"),
            }
        }
        let compiled = self.engine.precompile_component(bytes).map_err(compile_error)?;
        if let Err(e) = write_atomically(dir, &cached, &compiled) {
            tracing::warn!(cache = %dir.display(), "cannot cache the compiled plug-in: {e}");
        }
        // SAFETY: the bytes were produced by this engine a moment ago.
        unsafe { Component::deserialize(&self.engine, &compiled) }.map_err(compile_error)
    }
}

fn write_atomically(dir: &Path, target: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let temporary = target.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&temporary, bytes)?;
    std::fs::rename(&temporary, target)
}

/// Refuses a component whose `iotdr:plugin` imports carry an incompatible version.
fn check_contract_version(engine: &Engine, component: &Component, path: &Path) -> Result<(), LoadError> {
    let mut found_contract = false;
    for (name, _) in component.component_type().imports(engine) {
        let Some(rest) = name.strip_prefix(CONTRACT_PACKAGE).and_then(|r| r.strip_prefix('/')) else {
            continue;
        };
        found_contract = true;
        let version = rest.split_once('@').map(|(_, v)| v).unwrap_or("(unversioned)");
        if !compatible(version, CONTRACT_VERSION) {
            return Err(LoadError::IncompatibleVersion { path: path.to_path_buf(), found: version.to_string() });
        }
    }
    if found_contract { Ok(()) } else { Err(LoadError::NotAPlugin { path: path.to_path_buf() }) }
}

/// Semver compatibility: same major; for 0.x, same minor too.
fn compatible(found: &str, ours: &str) -> bool {
    let parse = |v: &str| -> Option<(u64, u64)> {
        let mut parts = v.split(['.', '-', '+']);
        Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
    };
    match (parse(found), parse(ours)) {
        (Some((0, found_minor)), Some((0, our_minor))) => found_minor == our_minor,
        (Some((found_major, _)), Some((our_major, _))) => found_major == our_major,
        _ => false,
    }
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until the engine is dropped.
fn spawn_epoch_ticker(engine: &Engine) {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("iotdr-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        })
        .expect("spawning the epoch thread");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::compatible;

    #[test]
    fn semver_compatibility() {
        assert!(compatible("0.1.0", "0.1.0"));
        assert!(compatible("0.1.7", "0.1.0"));
        assert!(!compatible("0.2.0", "0.1.0"));
        assert!(!compatible("1.0.0", "0.1.0"));
        assert!(compatible("1.4.0", "1.0.0"));
        assert!(!compatible("2.0.0", "1.9.0"));
        assert!(!compatible("(unversioned)", "0.1.0"));
    }
}
