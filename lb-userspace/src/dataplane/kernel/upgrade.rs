//! `lbd upgrade`: replaces the program inside every pinned link with the `lb_xdp` (and, in the
//! health-check links, the `lb_hc_encap`) embedded in this binary, on the maps already pinned,
//! so a new data plane takes over without a packet meeting an interface without a program and
//! without losing a flow. It writes no map.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::{EbpfLoader, maps::MapData};
use lb_common::maps;

use super::{LinkAdoption, PINNED_MAPS, adopt_link, hc, loaded_map, program_error, program_mut};
use crate::dataplane::DataPlaneError;

/// Loads `lb_xdp` on the maps pinned under `<pin_dir>/maps` and swaps it into every link pinned
/// under `<pin_dir>/links/<iface>` (`BPF_LINK_UPDATE`), and `lb_hc_encap` into every link pinned
/// under `<pin_dir>/hc-links/<iface>`. Refuses when a map pin is missing: the new programs must
/// run on the running maps, never on fresh ones. Returns the interfaces whose link now runs the
/// new program (`hc:<iface>` for a health-check link); a link whose interface is gone is
/// skipped (and logged).
pub fn upgrade(pin_dir: &Path) -> Result<Vec<String>, DataPlaneError> {
    let map_dir = pin_dir.join("maps");
    // The new program must fit the running maps exactly: the verifier would otherwise refuse
    // it with an out-of-bounds access and no word about why.
    super::pins::check(
        &map_dir,
        crate::lb_object(),
        super::pins::OnMismatch::Refuse,
    )?;
    // Every pin opened (and its map id noted) before loading: the loader silently creates and
    // pins any map whose pin it cannot open.
    let mut pinned = Vec::with_capacity(PINNED_MAPS.len());
    for name in PINNED_MAPS {
        let path = map_dir.join(name);
        let data = MapData::from_pin(&path).map_err(|e| DataPlaneError::Pin {
            path: path.clone(),
            source: io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "cannot open the pinned map {name} ({e}); upgrade only reuses the maps of \
                     a running data plane and never creates them (start lbd instead)"
                ),
            ),
        })?;
        let id = data.info().map_err(|e| DataPlaneError::map(name, e))?.id();
        pinned.push((name, id, data));
    }
    let links = pinned_links(&pin_dir.join("links"))?;
    let hc_links = pinned_links(&pin_dir.join(hc::LINK_DIR))?;
    if links.is_empty() && hc_links.is_empty() {
        return Ok(Vec::new());
    }

    let mut loader = EbpfLoader::new();
    for name in PINNED_MAPS {
        loader.map_pin_path(name, map_dir.join(name));
    }
    let mut ebpf = loader
        .load(crate::lb_object())
        .map_err(|e| DataPlaneError::Load(Box::new(e)))?;
    for (name, id, _) in &pinned {
        let loaded = loaded_map(&ebpf, name)?
            .info()
            .map_err(|e| DataPlaneError::map(name, e))?
            .id();
        if loaded != *id {
            return Err(DataPlaneError::Pin {
                path: map_dir.join(name),
                source: io::Error::other(format!(
                    "the pin changed during the upgrade (map id {id}, now {loaded}); no link \
                     was touched"
                )),
            });
        }
    }
    let mut upgraded = Vec::with_capacity(links.len() + hc_links.len());
    if !links.is_empty() {
        let program = program_mut(&mut ebpf)?;
        program
            .load()
            .map_err(|e| program_error(maps::PROG_LB, e))?;
        for (iface, pin) in links {
            let outcome = adopt_link(program, &pin);
            record(outcome, iface, &pin, &mut upgraded)?;
        }
    }
    if !hc_links.is_empty() {
        let program = hc::loaded_program(&mut ebpf)?;
        for (iface, pin) in hc_links {
            let outcome = hc::adopt_link(program, &pin);
            record(outcome, format!("hc:{iface}"), &pin, &mut upgraded)?;
        }
    }
    Ok(upgraded)
}

/// Notes a link whose program was replaced, logs a stale one, and fails on any other error.
fn record(
    outcome: Result<(), LinkAdoption>,
    iface: String,
    pin: &Path,
    upgraded: &mut Vec<String>,
) -> Result<(), DataPlaneError> {
    match outcome {
        Ok(()) => upgraded.push(iface),
        Err(LinkAdoption::Stale(reason)) => {
            tracing::warn!(iface, %reason, pin = %pin.display(), "stale link pin, not upgraded");
        }
        Err(LinkAdoption::Failed(reason)) => {
            return Err(DataPlaneError::Interface {
                iface,
                reason: format!(
                    "replacing the program in the pinned link {}: {reason} (already upgraded: \
                     {upgraded:?})",
                    pin.display()
                ),
            });
        }
    }
    Ok(())
}

/// `(interface, pin)` of every link pinned in `dir`, sorted; none when `dir` does not exist.
fn pinned_links(dir: &Path) -> Result<Vec<(String, PathBuf)>, DataPlaneError> {
    let pin_error = |source| DataPlaneError::Pin {
        path: dir.to_path_buf(),
        source,
    };
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(pin_error(e)),
    };
    let mut links = Vec::new();
    for entry in entries {
        let entry = entry.map_err(pin_error)?;
        let iface = entry.file_name().to_string_lossy().into_owned();
        links.push((iface, entry.path()));
    }
    links.sort();
    Ok(links)
}
