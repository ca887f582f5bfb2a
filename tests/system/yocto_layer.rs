//! The Yocto layer (`yocto/meta-bmsgw`) against the tree it builds. No
//! bitbake runs here, so this is what keeps the layer from rotting: the
//! crates include lists exactly the crates.io packages of `Cargo.lock`, every
//! file the recipe takes from the source tree exists (and the licence line
//! still has the checksum the recipe states), the recipe installs what the
//! Debian package installs, and it builds the lean ECU binary
//! (`--no-default-features`).
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

const LAYER: &str = "yocto/meta-bmsgw";
const RECIPE: &str = "yocto/meta-bmsgw/recipes-connectivity/bmsgw/bmsgw_git.bb";
const CRATES_INC: &str = "yocto/meta-bmsgw/recipes-connectivity/bmsgw/bmsgw-crates.inc";
const REGENERATE: &str = "run yocto/meta-bmsgw/scripts/gen-crates-inc.py to regenerate it";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    let path = repo().join(relative);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (the Yocto layer needs it)", path.display()))
}

/// `(name, version)` → sha256 of a crate.
type Crates = BTreeMap<(String, String), String>;

/// The crates.io packages of a Cargo.lock. Path packages (the root crate)
/// have no `source` and git packages a `git+` one: neither is fetched with
/// `crate://`, so neither belongs in the include.
fn lock_registry_packages(lock: &str) -> Crates {
    let mut out = Crates::new();
    let mut flush = |fields: &mut BTreeMap<&str, String>| {
        let source = fields.get("source").map(String::as_str).unwrap_or("");
        if source.contains("crates.io") {
            let field = |k: &str| {
                fields
                    .get(k)
                    .cloned()
                    .unwrap_or_else(|| panic!("Cargo.lock: a crates.io package without `{k}`"))
            };
            out.insert((field("name"), field("version")), field("checksum"));
        }
        fields.clear();
    };
    let mut fields = BTreeMap::new();
    let mut in_array = false;
    for line in lock.lines() {
        let line = line.trim();
        if in_array {
            in_array = !line.starts_with(']');
            continue;
        }
        if line.starts_with('[') {
            flush(&mut fields);
            continue;
        }
        let Some((key, value)) = line.split_once(" = ") else {
            continue;
        };
        if value == "[" {
            in_array = true;
        } else if let Some(s) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
            fields.insert(key, s.to_string());
        }
    }
    flush(&mut fields);
    out
}

/// The crates of an include in oe-core's `cargo-update-recipe-crates`
/// format, or what is malformed about it.
fn inc_crates(inc: &str) -> Result<Crates, Vec<String>> {
    let mut problems = Vec::new();
    // checksum key → (name, version), from the `crate://` entries.
    let mut entries = BTreeMap::new();
    let mut checksums = BTreeMap::new();
    for line in inc.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("crate://crates.io/") {
            let rest = rest.trim_end_matches('\\').trim();
            let (path, params) = rest.split_once(';').unwrap_or((rest, ""));
            let Some((name, version)) = path.split_once('/') else {
                problems.push(format!("malformed entry `{line}`"));
                continue;
            };
            let key = format!("{name}-{version}");
            // The fetcher keys the checksum on `name=`, NAME-VERSION by default.
            let named = params
                .split(';')
                .find_map(|p| p.strip_prefix("name="))
                .unwrap_or(&key);
            if named != key {
                problems.push(format!("`{line}`: name={named}, expected name={key}"));
            }
            if entries
                .insert(key.clone(), (name.to_string(), version.to_string()))
                .is_some()
            {
                problems.push(format!("{name} {version} listed twice"));
            }
        } else if let Some(rest) = line.strip_prefix("SRC_URI[") {
            let parsed = rest
                .split_once(".sha256sum] = \"")
                .and_then(|(key, value)| value.strip_suffix('"').map(|hex| (key.to_string(), hex)));
            match parsed {
                Some((key, hex))
                    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) =>
                {
                    if checksums.insert(key.clone(), hex.to_string()).is_some() {
                        problems.push(format!("two checksums for {key}"));
                    }
                }
                _ => problems.push(format!("malformed checksum line `{line}`")),
            }
        }
    }
    let mut out = Crates::new();
    for (key, (name, version)) in entries {
        match checksums.remove(&key) {
            Some(sum) => {
                out.insert((name, version), sum);
            }
            None => problems.push(format!("{name} {version} has no SRC_URI[{key}.sha256sum]")),
        }
    }
    problems.extend(
        checksums
            .keys()
            .map(|k| format!("checksum for {k}, which is not in SRC_URI")),
    );
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

/// What differs between the include and the lock file; empty if nothing.
fn crates_problems(lock: &str, inc: &str) -> Vec<String> {
    let listed = match inc_crates(inc) {
        Ok(listed) => listed,
        Err(problems) => return problems,
    };
    let locked = lock_registry_packages(lock);
    let mut problems = Vec::new();
    for ((name, version), sum) in &locked {
        match listed.get(&(name.clone(), version.clone())) {
            None => problems.push(format!("missing: {name} {version}")),
            Some(s) if s != sum => problems.push(format!(
                "{name} {version}: checksum {s}, Cargo.lock has {sum}"
            )),
            Some(_) => {}
        }
    }
    for (name, version) in listed.keys() {
        if !locked.contains_key(&(name.clone(), version.clone())) {
            problems.push(format!("not in Cargo.lock: {name} {version}"));
        }
    }
    problems
}

#[test]
fn crates_include_lists_exactly_the_registry_packages_of_cargo_lock() {
    let lock = read("Cargo.lock");
    let inc = read(CRATES_INC);
    let problems = crates_problems(&lock, &inc);
    assert!(
        problems.is_empty(),
        "{CRATES_INC} does not match Cargo.lock ({REGENERATE}):\n  {}",
        problems.join("\n  ")
    );
    // Guards against a parser that silently finds nothing on both sides.
    assert!(lock_registry_packages(&lock).len() > 100);
}

#[test]
fn crates_check_catches_missing_extra_and_altered_crates() {
    let sum_a = "a".repeat(64);
    let sum_b = "b".repeat(64);
    let lock = format!(
        "version = 4\n\n[[package]]\nname = \"alpha\"\nversion = \"1.0.0\"\n\
         source = \"registry+https://github.com/rust-lang/crates.io-index\"\n\
         checksum = \"{sum_a}\"\ndependencies = [\n \"beta\",\n]\n\n\
         [[package]]\nname = \"beta\"\nversion = \"2.0.0\"\n\
         source = \"registry+https://github.com/rust-lang/crates.io-index\"\n\
         checksum = \"{sum_b}\"\n\n\
         [[package]]\nname = \"fromgit\"\nversion = \"0.1.0\"\n\
         source = \"git+https://example.com/x.git#0123\"\n\n\
         [[package]]\nname = \"root\"\nversion = \"0.1.0\"\n"
    );
    let inc = |entries: &[(&str, &str, &str)]| {
        let mut s = String::from("SRC_URI += \" \\\n");
        for (n, v, _) in entries {
            s += &format!("    crate://crates.io/{n}/{v};name={n}-{v} \\\n");
        }
        s += "\"\n\n";
        for (n, v, sum) in entries {
            s += &format!("SRC_URI[{n}-{v}.sha256sum] = \"{sum}\"\n");
        }
        s
    };
    let good = inc(&[("alpha", "1.0.0", &sum_a), ("beta", "2.0.0", &sum_b)]);
    assert_eq!(crates_problems(&lock, &good), Vec::<String>::new());

    let missing = inc(&[("alpha", "1.0.0", &sum_a)]);
    assert_eq!(crates_problems(&lock, &missing), ["missing: beta 2.0.0"]);

    let extra = inc(&[
        ("alpha", "1.0.0", &sum_a),
        ("beta", "2.0.0", &sum_b),
        ("fromgit", "0.1.0", &sum_a),
    ]);
    assert_eq!(
        crates_problems(&lock, &extra),
        ["not in Cargo.lock: fromgit 0.1.0"]
    );

    let altered = inc(&[("alpha", "1.0.0", &sum_b), ("beta", "2.0.0", &sum_b)]);
    assert_eq!(crates_problems(&lock, &altered).len(), 1);

    let unsummed = good.replace(
        &format!("SRC_URI[beta-2.0.0.sha256sum] = \"{sum_b}\"\n"),
        "",
    );
    assert_eq!(
        crates_problems(&lock, &unsummed),
        ["beta 2.0.0 has no SRC_URI[beta-2.0.0.sha256sum]"]
    );
}

/// The value of `VAR = "..."` or `VAR += "..."` in a recipe (continuation
/// lines joined); every assignment to VAR, in order.
fn assignments(text: &str, var: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let Some(rest) = line.strip_prefix(var) else {
            continue;
        };
        let Some((op, value)) = rest.split_once('"') else {
            continue;
        };
        if !matches!(op.trim(), "=" | "+=" | "?=" | ":append =") {
            continue;
        }
        let mut value = value.to_string();
        while value.ends_with('\\') {
            value.pop();
            value += lines.next().unwrap_or("");
        }
        out.push(value.trim_end().trim_end_matches('"').to_string());
    }
    out
}

/// Paths under `${S}/` the recipe refers to.
fn source_tree_paths(recipe: &str) -> Vec<String> {
    recipe
        .split("${S}/")
        .skip(1)
        .map(|rest| {
            rest.split(|c: char| c.is_whitespace() || c == '"' || c == '\\')
                .next()
                .unwrap_or("")
                .to_string()
        })
        .collect()
}

#[test]
fn every_file_the_recipe_takes_from_the_source_tree_exists() {
    let recipe = read(RECIPE);
    let paths = source_tree_paths(&recipe);
    assert!(
        paths.iter().any(|p| p == "systemd/bmsgw.service"),
        "{RECIPE} must install systemd/bmsgw.service"
    );
    for path in &paths {
        assert!(
            repo().join(path).is_file(),
            "{RECIPE} installs ${{S}}/{path}, which is not in the repository: \
             fix the path in do_install or restore the file"
        );
    }
    for unit in assignments(&recipe, "SYSTEMD_SERVICE:${PN}")
        .iter()
        .flat_map(|v| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
    {
        assert!(
            paths.contains(&format!("systemd/{unit}")),
            "SYSTEMD_SERVICE names {unit}, but {RECIPE} does not install systemd/{unit}"
        );
    }
}

#[test]
fn license_checksum_matches_the_file_it_points_at() {
    let recipe = read(RECIPE);
    let chksum = assignments(&recipe, "LIC_FILES_CHKSUM");
    let entries: Vec<&str> = chksum.iter().flat_map(|v| v.split_whitespace()).collect();
    assert!(!entries.is_empty(), "{RECIPE} has no LIC_FILES_CHKSUM");
    for entry in entries {
        let mut parts = entry.trim_start_matches("file://").split(';');
        let file = parts.next().unwrap_or("");
        let params: BTreeMap<&str, &str> = parts.filter_map(|p| p.split_once('=')).collect();
        let bytes = std::fs::read(repo().join(file)).unwrap_or_else(|e| {
            panic!(
                "LIC_FILES_CHKSUM in {RECIPE} points at {file}: {e}; point it at a file that exists"
            )
        });
        let line_no = |k: &str| {
            params
                .get(k)
                .map(|v| v.parse::<usize>().expect("a line number"))
        };
        // bitbake's licence check: md5 of lines beginline..=endline with their newlines.
        let selected: Vec<u8> = match (line_no("beginline"), line_no("endline")) {
            (None, None) => bytes,
            (begin, end) => bytes
                .split_inclusive(|&b| b == b'\n')
                .zip(1..)
                .filter(|&(_, n)| begin.is_none_or(|b| n >= b) && end.is_none_or(|e| n <= e))
                .flat_map(|(l, _)| l.iter().copied())
                .collect(),
        };
        let text = String::from_utf8_lossy(&selected);
        let expected = md5_hex(&selected);
        assert_eq!(
            params.get("md5").copied(),
            Some(expected.as_str()),
            "LIC_FILES_CHKSUM in {RECIPE}: {file} lines {}..{} now read {text:?}; \
             point beginline/endline at the `license` line and set md5={expected}",
            params.get("beginline").unwrap_or(&"1"),
            params.get("endline").unwrap_or(&"end"),
        );
        if file == "Cargo.toml" {
            assert_eq!(
                text.trim(),
                "license = \"Apache-2.0\"",
                "the lines LIC_FILES_CHKSUM selects in Cargo.toml are not its licence line"
            );
        }
    }
    assert_eq!(assignments(&recipe, "LICENSE"), ["Apache-2.0"]);
}

#[test]
fn recipe_installs_what_the_debian_package_installs() {
    let recipe = read(RECIPE);
    let paths = source_tree_paths(&recipe);
    let manifest = read("Cargo.toml");
    let deb = manifest
        .split("[package.metadata.deb]")
        .nth(1)
        .expect("Cargo.toml has a [package.metadata.deb] section");
    // Asset lines: ["source", "destination", "mode"],
    let sources: Vec<&str> = deb
        .lines()
        .filter_map(|l| l.trim().strip_prefix("[\""))
        .filter_map(|l| l.split('"').next())
        .collect();
    assert!(
        sources.len() > 5,
        "no assets found in [package.metadata.deb]"
    );
    for source in sources {
        // The binary is the cargo class's own install.
        if source == "target/release/bmsgw" {
            continue;
        }
        assert!(
            paths.iter().any(|p| p == source),
            "the .deb ships {source} but {RECIPE} does not install it: add it to do_install:append"
        );
    }
    for (needle, why) in [
        (
            "${S}/systemd/bmsgw.service ${D}${systemd_system_unitdir}/",
            "the unit into ${systemd_system_unitdir}",
        ),
        (
            "${S}/systemd/bmsgw.sysusers.conf ${D}${nonarch_libdir}/sysusers.d/bmsgw.conf",
            "the sysusers entry as ${nonarch_libdir}/sysusers.d/bmsgw.conf",
        ),
        (
            "install -m 0640 -o root -g bmsgw ${S}/config/bmsgw.toml ${D}${sysconfdir}/bmsgw/bmsgw.toml",
            "the config as /etc/bmsgw/bmsgw.toml, root:bmsgw 0640 as the .deb's postinst leaves it",
        ),
    ] {
        assert!(
            recipe.contains(needle),
            "{RECIPE} must install {why}: `{needle}`"
        );
    }
    assert_eq!(
        assignments(&recipe, "CONFFILES:${PN}"),
        ["${sysconfdir}/bmsgw/bmsgw.toml"],
        "the example config must be a conffile, as in the .deb"
    );
}

#[test]
fn recipe_user_matches_the_sysusers_entry() {
    let recipe = read(RECIPE);
    let sysusers = read("systemd/bmsgw.sysusers.conf");
    let user = sysusers
        .lines()
        .find(|l| l.starts_with("u "))
        .expect("systemd/bmsgw.sysusers.conf has a `u` line");
    let name = user.split_whitespace().nth(1).expect("a user name");
    let home = user
        .rsplit('"')
        .next()
        .map(str::trim)
        .expect("a home directory");
    let params = assignments(&recipe, "USERADD_PARAM:${PN}").join(" ");
    // oe-core's image check warns when /etc/passwd and sysusers.d disagree.
    assert!(
        params.contains(&format!("--home-dir {home}")) && params.trim_end().ends_with(name),
        "USERADD_PARAM:${{PN}} in {RECIPE} is `{params}`: it must create {name} with \
         --home-dir {home}, as systemd/bmsgw.sysusers.conf does"
    );
}

#[test]
fn recipe_builds_the_lean_ecu_binary() {
    let recipe = read(RECIPE);
    let inherit = recipe
        .lines()
        .position(|l| l.starts_with("inherit ") && l.split_whitespace().any(|c| c == "cargo"))
        .unwrap_or_else(|| panic!("{RECIPE} must `inherit cargo`"));
    let flags = recipe
        .lines()
        .position(|l| {
            l.starts_with("CARGO_BUILD_FLAGS")
                && (l.contains("+=") || l.contains(":append"))
                && l.contains("--no-default-features")
        })
        .unwrap_or_else(|| {
            panic!(
                "{RECIPE} must build with `CARGO_BUILD_FLAGS += \"--no-default-features\"`: \
                 the default feature `sim` is not for the ECU"
            )
        });
    // cargo.bbclass assigns CARGO_BUILD_FLAGS with `=`, which would drop an
    // earlier `+=`.
    assert!(
        flags > inherit,
        "in {RECIPE}, CARGO_BUILD_FLAGS += must come after `inherit cargo`"
    );
    for enabling in ["--all-features", "--features", "-F "] {
        assert!(
            !recipe.contains(enabling),
            "{RECIPE} passes `{enabling}`: the ECU build has no features (remove it)"
        );
    }
    assert!(
        recipe
            .lines()
            .any(|l| l.trim() == "require ${BPN}-crates.inc"),
        "{RECIPE} must `require ${{BPN}}-crates.inc` ({REGENERATE})"
    );
}

#[test]
fn layer_conf_declares_the_collection() {
    let conf = read(&format!("{LAYER}/conf/layer.conf"));
    for needle in [
        "BBFILE_COLLECTIONS += \"bmsgw\"",
        "BBFILE_PATTERN_bmsgw = \"^${LAYERDIR}/\"",
        "BBFILE_PRIORITY_bmsgw = ",
        "LAYERDEPENDS_bmsgw = \"core\"",
        "${LAYERDIR}/recipes-*/*/*.bb",
    ] {
        assert!(
            conf.contains(needle),
            "{LAYER}/conf/layer.conf lacks `{needle}`"
        );
    }
    let compat = assignments(&conf, "LAYERSERIES_COMPAT_bmsgw").join(" ");
    assert!(
        compat.split_whitespace().any(|r| r == "scarthgap"),
        "LAYERSERIES_COMPAT_bmsgw must name the LTS release scarthgap"
    );
}

/// MD5 (RFC 1321), only for the licence checksum bitbake computes; the crate
/// has no MD5 dependency and needs none outside this test.
fn md5_hex(input: &[u8]) -> String {
    const SHIFT: [u32; 16] = [7, 12, 17, 22, 5, 9, 14, 20, 4, 11, 16, 23, 6, 10, 15, 21];
    let k: Vec<u32> = (0..64)
        .map(|i| ((i as f64 + 1.0).sin().abs() * 4_294_967_296.0) as u32)
        .collect();
    let mut message = input.to_vec();
    message.push(0x80);
    while message.len() % 64 != 56 {
        message.push(0);
    }
    message.extend_from_slice(&((input.len() as u64).wrapping_mul(8)).to_le_bytes());
    let mut state: [u32; 4] = [0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476];
    for block in message.chunks_exact(64) {
        let words: Vec<u32> = block
            .chunks_exact(4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .collect();
        let [mut a, mut b, mut c, mut d] = state;
        for i in 0..64 {
            let (f, g) = match i / 16 {
                0 => ((b & c) | (!b & d), i),
                1 => ((d & b) | (!d & c), (5 * i + 1) % 16),
                2 => (b ^ c ^ d, (3 * i + 5) % 16),
                _ => (c ^ (b | !d), (7 * i) % 16),
            };
            let rotated = a
                .wrapping_add(f)
                .wrapping_add(k[i])
                .wrapping_add(words[g])
                .rotate_left(SHIFT[(i / 16) * 4 + i % 4]);
            (a, d, c) = (d, c, b);
            b = b.wrapping_add(rotated);
        }
        for (s, v) in state.iter_mut().zip([a, b, c, d]) {
            *s = s.wrapping_add(v);
        }
    }
    state
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

#[test]
fn md5_matches_the_rfc_1321_test_suite() {
    for (input, digest) in [
        ("", "d41d8cd98f00b204e9800998ecf8427e"),
        ("abc", "900150983cd24fb0d6963f7d28e17f72"),
        ("message digest", "f96b697d7cb7938d525a2f31aaf161d0"),
        (
            "12345678901234567890123456789012345678901234567890123456789012345678901234567890",
            "57edf4a22be3c955ac49da2e2107b67a",
        ),
    ] {
        assert_eq!(md5_hex(input.as_bytes()), digest, "md5({input:?})");
    }
}
