# Sourced by the README's commands: installs the Debian packages they need when missing.
install_deps() {
    local need=()
    command -v pkg-config >/dev/null || need+=(pkg-config)
    dpkg -s libssl-dev >/dev/null 2>&1 || need+=(libssl-dev)
    command -v openssl >/dev/null || need+=(openssl)
    command -v curl >/dev/null || need+=(curl)
    command -v dnsmasq >/dev/null || [ -x /usr/sbin/dnsmasq ] || need+=(dnsmasq)
    # The shared session store of the resumption tests and the demo.
    command -v redis-server >/dev/null || need+=(redis-server)
    # The PKCS#11 key-store tests: a SoftHSM2 token per test.
    command -v softhsm2-util >/dev/null || need+=(softhsm2)
    # The hung-token test builds a small PKCS#11 module with the C compiler.
    command -v cc >/dev/null || need+=(gcc)
    # The package tests verify the systemd units.
    command -v systemd-analyze >/dev/null || need+=(systemd)
    if [ ${#need[@]} -gt 0 ]; then
        echo "installing: ${need[*]}"
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo=sudo
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
    fi
}
