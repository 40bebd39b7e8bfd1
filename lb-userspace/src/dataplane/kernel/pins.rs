//! Pinned maps left by an earlier lbd whose shape differs from this data plane's (a newer
//! release grew a value or added a counter). Maps lbd rebuilds on every start (configuration
//! and counters) are unpinned and created anew: the running program keeps its own references
//! to the old ones until the link swap, so forwarding and the flow table are untouched. A map
//! holding state that cannot be rebuilt (the flow table, backend slots, VIPs, Maglev tables)
//! must match, or lbd refuses with the map, the field and both values instead of letting the
//! verifier fail on an out-of-bounds access.

use std::{fs, io, path::Path};

use aya::maps::MapInfo;
use aya_obj::Object;
use lb_common::maps;

use super::PINNED_MAPS;
use crate::dataplane::DataPlaneError;

/// Maps whose contents lbd writes in full at start (config, guard limit) or may lose
/// (counters): replaced when their shape changed.
const REBUILT: [&str; 6] = [
    maps::CONFIG,
    maps::GUARD_LIMIT,
    maps::GUARD_STATE,
    maps::GLOBAL_STATS,
    maps::VIP_STATS,
    maps::BACKEND_STATS,
];

/// Maps lbd sizes by its options and otherwise adopts at their pinned size.
const SIZED_BY_OPTIONS: [&str; 2] = [maps::FLOWS, maps::RINGS];

/// How a pinned map differs from the object's definition.
#[derive(Debug, PartialEq, Eq)]
pub struct Mismatch {
    pub field: &'static str,
    pub pinned: u32,
    pub needed: u32,
}

/// What to do about maps whose shape changed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum OnMismatch {
    /// lbd start: replace the rebuilt maps, refuse for the rest.
    ReplaceRebuilt,
    /// `lbd upgrade`: writes no map, so refuses for any.
    Refuse,
}

/// Checks every map pinned under `map_dir` against `object`'s definitions. Returns the maps
/// whose pin was removed (to be created anew by the loader).
pub fn check(
    map_dir: &Path,
    object: &[u8],
    on_mismatch: OnMismatch,
) -> Result<Vec<&'static str>, DataPlaneError> {
    let object = Object::parse(object).map_err(|e| DataPlaneError::Pin {
        path: map_dir.to_path_buf(),
        source: io::Error::other(format!("cannot read the map definitions: {e}")),
    })?;
    let mut replaced = Vec::new();
    for name in PINNED_MAPS {
        let path = map_dir.join(name);
        if !path.exists() {
            continue;
        }
        let Some(def) = object.maps.get(name) else {
            return Err(DataPlaneError::MissingMap { name });
        };
        let pinned = MapInfo::from_pin(&path).map_err(|e| DataPlaneError::map(name, e))?;
        let resized = SIZED_BY_OPTIONS.contains(&name);
        let Some(mismatch) = compare(
            [pinned.key_size(), pinned.value_size(), pinned.max_entries()],
            [def.key_size(), def.value_size(), def.max_entries()],
            resized,
        ) else {
            continue;
        };
        if on_mismatch == OnMismatch::ReplaceRebuilt && REBUILT.contains(&name) {
            tracing::warn!(
                map = name,
                field = mismatch.field,
                pinned = mismatch.pinned,
                needed = mismatch.needed,
                "pinned map has an older shape: creating it anew (its counters restart at 0)"
            );
            fs::remove_file(&path).map_err(|source| DataPlaneError::Pin {
                path: path.clone(),
                source,
            })?;
            replaced.push(name);
            continue;
        }
        let advice = if on_mismatch == OnMismatch::Refuse && REBUILT.contains(&name) {
            "restart lbd instead: a start creates this map anew without touching flows"
        } else {
            "this release cannot adopt it; stop lbd, remove the pins (connections through \
             this host are then re-hashed) and start it again"
        };
        return Err(DataPlaneError::Pin {
            path,
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "pinned map {name} has {} {} but this data plane needs {}; {advice}",
                    mismatch.field, mismatch.pinned, mismatch.needed
                ),
            ),
        });
    }
    Ok(replaced)
}

/// The first difference between a pinned map's `[key size, value size, max entries]` and the
/// definition's; max entries are not compared for maps sized by lbd's options.
fn compare(pinned: [u32; 3], needed: [u32; 3], resized: bool) -> Option<Mismatch> {
    const FIELDS: [&str; 3] = ["key size", "value size", "max entries"];
    let compared = if resized { 2 } else { 3 };
    (0..compared)
        .find(|&i| pinned[i] != needed[i])
        .map(|i| Mismatch {
            field: FIELDS[i],
            pinned: pinned[i],
            needed: needed[i],
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_first_field_that_differs() {
        assert_eq!(compare([4, 16, 1], [4, 16, 1], false), None);
        assert_eq!(
            compare([4, 16, 1], [4, 40, 1], false),
            Some(Mismatch {
                field: "value size",
                pinned: 16,
                needed: 40
            })
        );
        assert_eq!(
            compare([4, 8, 16], [4, 8, 26], false).map(|m| m.field),
            Some("max entries")
        );
        // The flow table and ring pool keep the size they were created with.
        assert_eq!(compare([40, 16, 1000], [40, 16, 1 << 20], true), None);
        assert_eq!(
            compare([36, 16, 1000], [40, 16, 1 << 20], true).map(|m| m.field),
            Some("key size")
        );
    }

    #[test]
    fn state_that_cannot_be_rebuilt_is_never_replaced() {
        for name in [
            maps::FLOWS,
            maps::BACKENDS,
            maps::VIPS,
            maps::RINGS,
            maps::VIP_ADDRS,
        ] {
            assert!(!REBUILT.contains(&name), "{name}");
        }
        for name in REBUILT {
            assert!(PINNED_MAPS.contains(&name), "{name}");
        }
    }
}
