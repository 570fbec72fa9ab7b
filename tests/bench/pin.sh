# Sourced by the controller bench and the exit census where KVM is: `pin_vmm PID` waits for the
# vCPU threads of the VMM started as PID (or as its child: coreutils' timeout forks, busybox's
# execs) and pins vCPU N to host CPU N+1 and every other thread of it to CPU 0, the same for
# ferry (threads vcpuN) and QEMU (run with -name ...,debug-threads=on: threads "CPU N/KVM").
# Unpinned, the host's scheduler sometimes put a VMM's I/O thread on its vCPU's CPU: in the
# two-CPU test host one VMM's 4 KiB IOPS then swung by 30% from one boot to the next, more
# than ferry and QEMU differ. Threads started later (io_uring's workers, QEMU's pool) inherit
# CPU 0 from the thread that starts them. Does nothing where the host has no CPU to spare
# for each vCPU.

# The VMM's process among PID and its children: "ferry" or "qemu-system-*".
vmm_pid() {
    local p
    for p in $1 $(pgrep -P "$1"); do
        case $(cat "/proc/$p/comm" 2>/dev/null) in ferry|qemu-system-*) echo "$p"; return ;; esac
    done
}

pin_vmm() {
    local pid=$1 vcpus=$2 vmm="" t n cpu i=0 cpus
    cpus=$(grep -c '^processor' /proc/cpuinfo)
    [ "$cpus" -gt "$vcpus" ] || return 0
    command -v taskset >/dev/null || return 0
    while [ $i -lt 100 ]; do
        vmm=$(vmm_pid "$pid")
        # All vCPU threads are up.
        [ -n "$vmm" ] && [ "$(cat /proc/$vmm/task/*/comm 2>/dev/null | grep -c -E '^(vcpu[0-9]|CPU [0-9]+/KVM)')" -ge "$vcpus" ] && break
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
        i=$((i + 1))
    done
    [ -n "$vmm" ] || return 0
    for t in /proc/$vmm/task/*; do
        n=$(cat "$t/comm" 2>/dev/null) || continue
        case $n in
            vcpu[0-9]*) cpu=$(( ${n#vcpu} + 1 )) ;;
            CPU\ [0-9]*/KVM) n=${n#CPU }; cpu=$(( ${n%/KVM} + 1 )) ;;
            *) cpu=0 ;;
        esac
        taskset -p "$(printf %x $((1 << cpu)))" "${t##*/}" >/dev/null 2>&1
    done
}
