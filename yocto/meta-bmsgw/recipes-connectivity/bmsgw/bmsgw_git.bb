SUMMARY = "bmsgw vehicle gateway daemon (GB/T 27930 charging authentication over SocketCAN)"
DESCRIPTION = "bmsgw proves the vehicle to a GB/T 27930 charging pile with \
short-lived credentials from the OEM cloud (MQTT v5, TLS 1.3), keeps charging \
possible offline with vouchers, and firewalls the charging inlet's CAN bus. \
This is the lean ECU build: no simulators, embedded broker or dev PKI."
SECTION = "net"

# The repository has no LICENSE file; Cargo.toml's `license` line is the
# licence statement (tests/system/yocto_layer.rs checks this checksum).
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://Cargo.toml;beginline=7;endline=7;md5=2507bd5f0713f05419cd2f22fa06fe62"

# The integrator points this at the real repository (see README.md), and sets
# SRCREV to the commit to build; bmsgw-crates.inc must come from that commit's
# Cargo.lock. destsuffix=${BP} puts the checkout where the default S looks, so
# S is not set (newer releases refuse an S that points at a `git` directory).
BMSGW_GIT_URI ?= "git://git.example.com/bmsgw.git;protocol=https;branch=main"
SRC_URI = "${BMSGW_GIT_URI};destsuffix=${BP}"
SRCREV = "d36f779ca1c2c0b563b20208e79ecad0f6e50641"
PV = "0.1.0+git"

require ${BPN}-crates.inc

inherit cargo cargo-update-recipe-crates systemd useradd features_check

# The unit is Type=notify with a watchdog, and the user comes from sysusers.d.
REQUIRED_DISTRO_FEATURES = "systemd"

# The ECU build: `sim` (simulators, embedded broker, dev PKI) is the default
# feature and stays out. The class assigns CARGO_BUILD_FLAGS with `=`, so this
# must come after `inherit cargo`.
CARGO_BUILD_FLAGS += "--no-default-features"

# Cargo.toml's release profile strips symbols; leave that to do_package so the
# -dbg package gets them and the already-stripped QA check passes.
export CARGO_PROFILE_RELEASE_STRIP = "false"

# The user exists in /etc/passwd at image build time, so /etc/bmsgw can be
# root:bmsgw in the image (a read-only rootfs never runs systemd-sysusers).
# It matches systemd/bmsgw.sysusers.conf, which the image's sysusers check
# compares against /etc/passwd.
USERADD_PACKAGES = "${PN}"
USERADD_PARAM:${PN} = "--system --home-dir /var/lib/bmsgw --no-create-home \
                       --shell /sbin/nologin --user-group bmsgw"

SYSTEMD_SERVICE:${PN} = "bmsgw.service"

do_install:append() {
    install -d ${D}${systemd_system_unitdir}
    install -m 0644 ${S}/systemd/bmsgw.service ${D}${systemd_system_unitdir}/bmsgw.service

    install -d ${D}${nonarch_libdir}/sysusers.d
    install -m 0644 ${S}/systemd/bmsgw.sysusers.conf ${D}${nonarch_libdir}/sysusers.d/bmsgw.conf

    # As the .deb's postinst leaves them: only root and the service read it.
    install -d -m 0750 -o root -g bmsgw ${D}${sysconfdir}/bmsgw
    install -m 0640 -o root -g bmsgw ${S}/config/bmsgw.toml ${D}${sysconfdir}/bmsgw/bmsgw.toml

    # Documentation and examples, as the .deb ships them (package ${PN}-doc).
    install -d ${D}${docdir}/${BPN}/examples/networkd ${D}${docdir}/${BPN}/examples/mosquitto
    install -m 0644 ${S}/README.md ${S}/docs/protocol.md ${S}/docs/configuration.md \
        ${S}/docs/operations.md ${S}/docs/interop.md ${D}${docdir}/${BPN}/
    install -m 0644 ${S}/systemd/80-can0.network ${S}/systemd/80-can1.network \
        ${S}/systemd/80-vcan0.netdev ${S}/systemd/80-vcan0.network \
        ${S}/systemd/80-vcan1.netdev ${S}/systemd/80-vcan1.network \
        ${D}${docdir}/${BPN}/examples/networkd/
    install -m 0644 ${S}/config/mosquitto/mosquitto.conf \
        ${S}/config/mosquitto/dynamic-security.json ${S}/config/mosquitto/README.md \
        ${D}${docdir}/${BPN}/examples/mosquitto/
}

FILES:${PN} += "${nonarch_libdir}/sysusers.d/bmsgw.conf"
CONFFILES:${PN} = "${sysconfdir}/bmsgw/bmsgw.toml"

# Raw CAN sockets. Built-in options have no module package; a recommendation
# that cannot be met is skipped.
RRECOMMENDS:${PN} = "kernel-module-can kernel-module-can-raw"
