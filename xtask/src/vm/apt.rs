//! A private apt configuration under target/vm/apt (own sources list, lists, cache and an empty
//! dpkg status), used only to find and `apt-get download` stock Debian kernels and busybox-static.
//! The host's /etc/apt is never read for sources nor written.

use std::{
    cmp::Ordering,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::util::{output, run};

/// The suites the default kernels come from; every one is signed by a key in Debian's
/// debian-archive-keyring (bookworm's package carries the bullseye and trixie keys too).
const SOURCES: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie-backports main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bullseye-security main
";

/// The default kernels: (version prefix, suite), every supported series. The newest generic
/// amd64 image of that series in that suite is taken. 5.10 (bullseye-security, still in the
/// sources) is left out: `lb_xdp` needs 5.12 (`bpf_check_mtu`); `--kernel 5.10` boots it.
pub const DEFAULT_KERNELS: &[(&str, &str)] = &[
    ("6.1", "bookworm"),
    ("6.12", "bookworm-backports"),
    ("7", "trixie-backports"),
];

/// The private configuration, rooted at `<target>/vm/apt`, and the folder .debs land in.
pub struct Apt {
    root: PathBuf,
    debs: PathBuf,
}

impl Apt {
    /// Creates the folders and the sources list; `refresh` (or missing lists) runs `update`.
    pub fn open(vm_dir: &Path, refresh: bool) -> Result<Self> {
        let apt = Self {
            root: vm_dir.join("apt"),
            debs: vm_dir.join("debs"),
        };
        for dir in [
            apt.root.join("lists/partial"),
            apt.root.join("cache/archives/partial"),
            apt.root.join("state"),
            apt.debs.clone(),
        ] {
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let status = apt.root.join("state/status");
        if !status.exists() {
            fs::write(&status, "").with_context(|| format!("creating {}", status.display()))?;
        }
        let sources = apt.root.join("sources.list");
        let stale = fs::read_to_string(&sources).map_or(true, |text| text != SOURCES);
        if stale {
            fs::write(&sources, SOURCES)
                .with_context(|| format!("writing {}", sources.display()))?;
        }
        if refresh || stale || !apt.has_lists()? {
            println!(
                "vm: apt-get update (private lists in {})",
                apt.root.display()
            );
            run(apt.command("apt-get").arg("-q").arg("update"))?;
        }
        Ok(apt)
    }

    fn has_lists(&self) -> Result<bool> {
        let lists = self.root.join("lists");
        let found = fs::read_dir(&lists)
            .with_context(|| format!("reading {}", lists.display()))?
            .filter_map(Result::ok)
            .any(|entry| entry.file_name().to_string_lossy().contains("_Packages"));
        Ok(found)
    }

    /// `apt-get` or `apt-cache` with every directory pointed into the private root.
    fn command(&self, program: &str) -> Command {
        let root = self.root.display();
        let mut cmd = Command::new(program);
        for (key, value) in [
            ("Dir::Etc::SourceList", format!("{root}/sources.list")),
            ("Dir::Etc::SourceParts", "/dev/null".to_owned()),
            ("Dir::Etc::Preferences", "/dev/null".to_owned()),
            ("Dir::Etc::PreferencesParts", "/dev/null".to_owned()),
            ("Dir::State", format!("{root}/state")),
            ("Dir::State::Lists", format!("{root}/lists")),
            ("Dir::State::status", format!("{root}/state/status")),
            ("Dir::Cache", format!("{root}/cache")),
            // Root would otherwise hand downloads to the _apt user, who may not reach target/.
            ("APT::Sandbox::User", "root".to_owned()),
            ("Acquire::Languages", "none".to_owned()),
        ] {
            cmd.arg("-o").arg(format!("{key}={value}"));
        }
        cmd
    }

    /// The newest `linux-image-<series>.*-amd64` (generic flavour, signed or plain) that `suite`
    /// carries, or from any suite when `suite` is `None`.
    pub fn resolve_series(&self, series: &str, suite: Option<&str>) -> Result<String> {
        let prefix = format!("linux-image-{series}.");
        let names = output(self.command("apt-cache").args(["pkgnames", &prefix]))?;
        let candidates: Vec<&str> = names
            .lines()
            .filter(|name| {
                name.ends_with("-amd64")
                    && !name.contains("-cloud-")
                    && !name.contains("-rt-")
                    && name[prefix.len()..].starts_with(|c: char| c.is_ascii_digit())
            })
            .collect();
        if candidates.is_empty() {
            bail!("no {prefix}*-amd64 package in the private lists");
        }
        let madison = output(self.command("apt-cache").arg("madison").args(&candidates))?;
        let mut found: Vec<&str> = madison
            .lines()
            .filter_map(|line| {
                let mut fields = line.split('|').map(str::trim);
                let name = fields.next()?;
                let source = fields.nth(1)?;
                let from_suite = source
                    .split_whitespace()
                    .nth(1)
                    .and_then(|dist| dist.split('/').next());
                match suite {
                    Some(want) if from_suite != Some(want) => None,
                    _ => Some(name),
                }
            })
            .collect();
        found.sort_by(|a, b| natural_cmp(a, b));
        found
            .last()
            .map(|name| (*name).to_owned())
            .with_context(|| {
                format!(
                    "no {prefix}*-amd64 in {}",
                    suite.unwrap_or("any configured suite")
                )
            })
    }

    /// The .debs of `package` and of the `linux-binary-*`/`linux-modules-*`/`linux-base-*`
    /// packages it depends on (trixie's kernels split the image, the modules and the module index
    /// out of `linux-image-*`), downloaded
    /// unless already cached.
    pub fn kernel_debs(&self, package: &str) -> Result<Vec<PathBuf>> {
        let mut wanted = vec![package.to_owned()];
        // Read from the lists, so this needs no network once they exist.
        let show = output(
            self.command("apt-cache")
                .args(["show", "--no-all-versions"])
                .arg(package),
        )?;
        let depends = show
            .lines()
            .find_map(|line| line.strip_prefix("Depends:"))
            .unwrap_or_default();
        for dep in depends.split(',') {
            let name = dep.split_whitespace().next().unwrap_or_default();
            if ["linux-binary-", "linux-modules-", "linux-base-"]
                .iter()
                .any(|part| name.starts_with(part))
            {
                wanted.push(name.to_owned());
            }
        }
        wanted.iter().map(|name| self.deb(name)).collect()
    }

    /// The cached .deb of `package`, downloading it first when missing.
    pub fn deb(&self, package: &str) -> Result<PathBuf> {
        if let Some(path) = self.cached(package)? {
            return Ok(path);
        }
        println!("vm: apt-get download {package}");
        run(self
            .command("apt-get")
            .args(["-q", "download", package])
            .current_dir(&self.debs))?;
        self.cached(package)?
            .with_context(|| format!("apt-get download {package} left no {package}_*.deb"))
    }

    fn cached(&self, package: &str) -> Result<Option<PathBuf>> {
        let prefix = format!("{package}_");
        let mut hits: Vec<PathBuf> = fs::read_dir(&self.debs)
            .with_context(|| format!("reading {}", self.debs.display()))?
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| {
                path.file_name().is_some_and(|name| {
                    let name = name.to_string_lossy();
                    name.starts_with(&prefix) && name.ends_with(".deb")
                })
            })
            .collect();
        hits.sort_by(|a, b| natural_cmp(&a.to_string_lossy(), &b.to_string_lossy()));
        Ok(hits.pop())
    }
}

/// Compares strings with runs of digits compared as numbers (6.12.95 after 6.12.9).
fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let da = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let db = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (na, nb) = (trim_zeros(&a[..da]), trim_zeros(&b[..db]));
                let order = na.len().cmp(&nb.len()).then_with(|| na.cmp(nb));
                if order != Ordering::Equal {
                    return order;
                }
                a = &a[da..];
                b = &b[db..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(digits: &[u8]) -> &[u8] {
    let zeros = digits.iter().take_while(|&&c| c == b'0').count();
    &digits[zeros..]
}

#[cfg(test)]
mod tests {
    use std::cmp::Ordering;

    use super::natural_cmp;

    #[test]
    fn natural_order_compares_numbers() {
        assert_eq!(
            natural_cmp(
                "linux-image-6.12.95+deb12-amd64",
                "linux-image-6.12.9+deb12-amd64"
            ),
            Ordering::Greater
        );
        assert_eq!(
            natural_cmp("linux-image-5.10.0-46-amd64", "linux-image-5.10.0-5-amd64"),
            Ordering::Greater
        );
        assert_eq!(
            natural_cmp("linux-image-7.3.4+deb13", "linux-image-7.10.1+deb13"),
            Ordering::Less
        );
        assert_eq!(natural_cmp("a01", "a1"), Ordering::Equal);
    }
}
