#!/bin/bash
# PID 1 of the guest after vm/init switched to the host's root (read-only over 9p). Runs the test
# binaries listed in $run/tests ("name<TAB>path" per line) with the arguments in $run/args (one per
# line), writes per-binary results to $run/results and the overall status to $run/status, prints
# "LB-VM-RESULT <code>" for the console, and powers the guest off.
set -u

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root RUST_BACKTRACE=1
# The kernel-tunnel test must fail, not skip, when the kernel lacks what it needs.
export LB_REQUIRE_KERNEL_TUNNEL=1

arg() {
    local word
    for word in $(</proc/cmdline); do
        [[ $word == "$1="* ]] && echo "${word#*=}"
    done
}
repo=$(arg lbvm_repo)
run=$(arg lbvm_run)

poweroff_now() {
    sync
    echo o >/proc/sysrq-trigger
    sleep 30 2>/dev/null
}

read -r up _ </proc/uptime
echo "$up" >"$run/boot"
echo "lbvm: kernel $(uname -r) up after ${up}s; $(nproc) CPUs, $(awk '/MemTotal/ {print $2 " kB"}' /proc/meminfo)"

# Loaded up front so a missing module shows here, not as a confusing test failure; request_module
# would also find them through the host's modprobe.
for module in veth ipip ip6_tunnel fou fou6 sch_ingress cls_bpf bridge; do
    modprobe "$module" || echo "lbvm: modprobe $module failed"
done
ip link set lo up

mapfile -t test_args <"$run/args"
status=0
: >"$run/results"
while IFS=$'\t' read -r name exe; do
    [[ -n $name ]] || continue
    echo "lbvm: running $name ${test_args[*]}"
    start=$(date +%s.%N)
    (cd "$repo/tests" && "$exe" --test-threads=1 --color=never "${test_args[@]}")
    code=$?
    secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    echo "lbvm: $name exited $code after ${secs}s"
    printf '%s\t%s\t%s\n' "$name" "$code" "$secs" >>"$run/results"
    ((code == 0)) || status=1
done <"$run/tests"

echo "$status" >"$run/status"
echo "LB-VM-RESULT $status"
poweroff_now
