//! Debian packages for the kit: which mirror the machine already uses, the backports
//! suite derived from it (QEMU 10.0.2 there matches the preinstalled
//! qemu-storage-daemon), installing a package, and downloading and unpacking one
//! without installing it.

use super::process::{self, CommandError};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// How long one apt or dpkg command may take (a cold QEMU install downloads ~100 MB).
const APT_TIMEOUT: Duration = Duration::from_secs(600);

/// How long the reachability probe of the mirror may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The apt sources directory and the file the kit adds there.
const SOURCES_DIR: &str = "/etc/apt/sources.list.d";

/// Why a package step failed.
#[derive(Debug, thiserror::Error)]
pub enum AptError {
    /// An apt or dpkg command failed.
    #[error("Package command failed")]
    Command(#[from] CommandError),
    /// A file of apt's configuration could not be read or written.
    #[error("Could not access {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The meta-package names no versioned package.
    #[error("{0} does not depend on a versioned package")]
    Unresolved(String),
    /// apt-get download produced no archive.
    #[error("No archive of {0} was downloaded")]
    NoArchive(String),
}

/// One Debian source as apt knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// Its base URI, such as `http://mirror/debian`.
    pub uri: String,
    /// Its suites.
    pub suites: Vec<String>,
    /// The keyring it is signed with, if the entry names one.
    pub signed_by: Option<String>,
}

/// Parses deb822 `.sources` text: blank-line separated paragraphs of `Field: value`.
pub fn parse_deb822(text: &str) -> Vec<Source> {
    let mut out = Vec::new();
    for paragraph in text.split("\n\n") {
        let (mut types, mut uris, mut suites, mut signed_by) = (Vec::new(), Vec::new(), Vec::new(), None);
        for line in paragraph.lines().filter(|l| !l.trim_start().starts_with('#')) {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let words = || value.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
            match key.trim().to_ascii_lowercase().as_str() {
                "types" => types = words(),
                "uris" => uris = words(),
                "suites" => suites = words(),
                "signed-by" => signed_by = Some(value.trim().to_owned()),
                _ => {}
            }
        }
        if types.iter().any(|t| t == "deb") {
            out.extend(uris.into_iter().map(|uri| Source {
                uri,
                suites: suites.clone(),
                signed_by: signed_by.clone(),
            }));
        }
    }
    out
}

/// Parses one-line `sources.list` text: `deb [options] URI suite components...`.
pub fn parse_one_line(text: &str) -> Vec<Source> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| l.starts_with("deb ")) {
        let mut rest = line["deb ".len()..].trim_start();
        let mut signed_by = None;
        if let Some(options) = rest.strip_prefix('[') {
            let Some((options, after)) = options.split_once(']') else {
                continue;
            };
            signed_by = options
                .split_whitespace()
                .find_map(|o| o.strip_prefix("signed-by="))
                .map(str::to_owned);
            rest = after;
        }
        let mut words = rest.split_whitespace();
        if let (Some(uri), Some(suite)) = (words.next(), words.next()) {
            out.push(Source {
                uri: uri.to_owned(),
                suites: vec![suite.to_owned()],
                signed_by,
            });
        }
    }
    out
}

/// Every `deb` source configured on this machine.
pub fn machine_sources() -> Vec<Source> {
    let mut sources = std::fs::read_to_string("/etc/apt/sources.list")
        .map(|t| parse_one_line(&t))
        .unwrap_or_default();
    let Ok(dir) = std::fs::read_dir(SOURCES_DIR) else {
        return sources;
    };
    let mut paths: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
    paths.sort();
    for path in paths {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        match path.extension().and_then(|e| e.to_str()) {
            Some("sources") => sources.extend(parse_deb822(&text)),
            Some("list") => sources.extend(parse_one_line(&text)),
            _ => {}
        }
    }
    sources
}

/// The distribution's code name (`bookworm`), from os-release.
pub fn codename() -> Option<String> {
    let text = std::fs::read_to_string("/etc/os-release").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_owned())
}

/// The backports source to add for `codename`: the mirror that already serves the main
/// suite, with the `-backports` suite. `None` when the machine already has backports
/// configured or serves `codename` from no mirror.
pub fn backports_source(sources: &[Source], codename: &str) -> Option<Source> {
    let suite = format!("{codename}-backports");
    if sources.iter().any(|s| s.suites.contains(&suite)) {
        return None;
    }
    let main = sources.iter().find(|s| s.suites.iter().any(|x| x == codename))?;
    Some(Source {
        uri: main.uri.clone(),
        suites: vec![suite],
        signed_by: main.signed_by.clone(),
    })
}

/// Writes `source` as a deb822 file in apt's sources directory; the return is its path.
pub fn add_source(source: &Source) -> Result<PathBuf, AptError> {
    let suite = source.suites.join(" ");
    let path = Path::new(SOURCES_DIR).join(format!("vio-{}.sources", suite.replace(' ', "-")));
    let mut text = format!(
        "# Added by the vio Linux-guest test kit (tests/src/linux_guest).\nTypes: deb\nURIs: {}\nSuites: {suite}\nComponents: main\n",
        source.uri
    );
    if let Some(key) = &source.signed_by {
        text.push_str(&format!("Signed-By: {key}\n"));
    }
    std::fs::write(&path, text).map_err(|source| AptError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// Whether the host of `uri` accepts a TCP connection: tells "no network" apart from
/// a failing package step.
pub fn reachable(uri: &str) -> bool {
    let rest = uri.split_once("://").map_or(uri, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    let default_port = if uri.starts_with("https") { 443 } else { 80 };
    let addr = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:{default_port}")
    };
    let Ok(addrs) = addr.to_socket_addrs() else {
        return false;
    };
    addrs
        .into_iter()
        .any(|a| TcpStream::connect_timeout(&a, PROBE_TIMEOUT).is_ok())
}

/// An apt command that never asks a question, and waits (bounded) for another apt or
/// dpkg holding the lock, such as a test binary of another target directory.
fn apt(program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    if program == "apt-get" {
        cmd.args(["-o", "DPkg::Lock::Timeout=300"]);
    }
    cmd
}

/// `apt-get update`.
pub fn update() -> Result<(), AptError> {
    process::run(apt("apt-get").args(["-q", "update"]), APT_TIMEOUT)?;
    Ok(())
}

/// Installs `packages`, from `release` (a target release such as `bookworm-backports`)
/// when given.
pub fn install(packages: &[&str], release: Option<&str>) -> Result<(), AptError> {
    let mut cmd = apt("apt-get");
    cmd.args(["-q", "-y", "--no-install-recommends", "install"]);
    if let Some(release) = release {
        cmd.args(["-t", release]);
    }
    process::run(cmd.args(packages), APT_TIMEOUT)?;
    Ok(())
}

/// The versioned package a meta-package depends on (`linux-image-cloud-amd64` ->
/// `linux-image-6.1.0-48-cloud-amd64`), for its candidate version.
pub fn resolve(meta: &str) -> Result<String, AptError> {
    let out = process::run(apt("apt-cache").args(["depends", meta]), APT_TIMEOUT)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let prefix = meta.split('-').take(2).collect::<Vec<_>>().join("-");
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with(&prefix) && *p != meta)
        .map(str::to_owned)
        .ok_or_else(|| AptError::Unresolved(meta.to_owned()))
}

/// Downloads `package`'s archive into `dir` and unpacks it into `root` without
/// installing it.
pub fn download_and_unpack(package: &str, dir: &Path, root: &Path) -> Result<(), AptError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| AptError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    process::run(
        apt("apt-get").arg("download").arg(package).current_dir(dir),
        APT_TIMEOUT,
    )?;
    let archive = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            name.starts_with(&format!("{package}_")) && name.ends_with(".deb")
        })
        .ok_or_else(|| AptError::NoArchive(package.to_owned()))?;
    std::fs::create_dir_all(root).map_err(io(root))?;
    process::run(
        Command::new("dpkg-deb").arg("-x").arg(&archive).arg(root),
        APT_TIMEOUT,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEB822: &str = "Types: deb\n# a comment\nURIs: http://mirror.example/debian\n\
        Suites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/k.gpg\n\n\
        Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\nComponents: main\n";

    #[test]
    fn backports_come_from_the_mirror_of_the_main_suite() {
        let sources = parse_deb822(DEB822);
        assert_eq!(sources.len(), 2);
        let bp = backports_source(&sources, "bookworm").unwrap();
        assert_eq!(bp.uri, "http://mirror.example/debian");
        assert_eq!(bp.suites, ["bookworm-backports"]);
        assert_eq!(bp.signed_by.as_deref(), Some("/usr/share/keyrings/k.gpg"));
    }

    #[test]
    fn configured_backports_are_not_added_twice() {
        let mut sources = parse_deb822(DEB822);
        sources.extend(parse_one_line(
            "deb [arch=amd64 signed-by=/k.gpg] http://m/debian bookworm-backports main\n",
        ));
        assert_eq!(sources[2].signed_by.as_deref(), Some("/k.gpg"));
        assert_eq!(backports_source(&sources, "bookworm"), None);
        assert_eq!(
            backports_source(&sources, "trixie"),
            None,
            "no mirror serves trixie"
        );
    }

    #[test]
    fn deb_src_only_paragraphs_are_ignored() {
        assert!(parse_deb822("Types: deb-src\nURIs: http://m/debian\nSuites: bookworm\n").is_empty());
        assert!(parse_one_line("deb-src http://m/debian bookworm main\n").is_empty());
    }
}
