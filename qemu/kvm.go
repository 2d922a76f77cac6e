package qemu

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// KVM ioctls and exit reasons, from linux/kvm.h.
const (
	kvmGetAPIVersion       = 0xAE00
	kvmCreateVM            = 0xAE01
	kvmGetVCPUMmapSize     = 0xAE04
	kvmGetSupportedCPUID   = 0xC008AE05
	kvmCreateVCPU          = 0xAE41
	kvmSetUserMemoryRegion = 0x4020AE46
	kvmRun                 = 0xAE80
	kvmGetRegs             = 0x8090AE81
	kvmSetRegs             = 0x4090AE82
	kvmGetSregs            = 0x8138AE83
	kvmSetSregs            = 0x4138AE84

	kvmExitIO  = 2
	kvmExitHLT = 5
)

// kvmProbeTimeout bounds the probe's guest run: where KVM opens but never
// runs guest code, KVM_RUN does not return.
const kvmProbeTimeout = 2 * time.Second

// probeKVM runs three real-mode instructions (out, out, hlt) in a fresh
// KVM virtual machine. Opening /dev/kvm is not enough: on some hosts it
// opens and creates VMs, but a guest never runs.
func probeKVM() error {
	kvm, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer kvm.Close()
	if v, err := ioctl(kvm.Fd(), kvmGetAPIVersion, nil); err != nil || v != 12 {
		return fmt.Errorf("KVM API version %d (%v), want 12", v, err)
	}
	if err := checkCPUID(kvm.Fd()); err != nil {
		return err
	}
	runSize, err := ioctl(kvm.Fd(), kvmGetVCPUMmapSize, nil)
	if err != nil {
		return fmt.Errorf("KVM_GET_VCPU_MMAP_SIZE: %w", err)
	}
	vmfd, err := ioctl(kvm.Fd(), kvmCreateVM, nil)
	if err != nil {
		return fmt.Errorf("KVM_CREATE_VM: %w", err)
	}
	// The VM and vCPU are released with their descriptors. If the run
	// below never returns, they stay with the blocked thread until exit.
	mem, err := unix.Mmap(-1, 0, 0x1000, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_ANONYMOUS)
	if err != nil {
		unix.Close(int(vmfd))
		return err
	}
	// mov al, 0x42; out 0x10, al; out 0x10, al; hlt
	copy(mem, []byte{0xb0, 0x42, 0xe6, 0x10, 0xe6, 0x10, 0xf4})
	region := struct {
		slot, flags                    uint32
		guestPhys, size, userspaceAddr uint64
	}{0, 0, 0x1000, 0x1000, uint64(uintptr(unsafe.Pointer(&mem[0])))}
	if _, err := ioctl(vmfd, kvmSetUserMemoryRegion, unsafe.Pointer(&region)); err != nil {
		unix.Close(int(vmfd))
		unix.Munmap(mem)
		return fmt.Errorf("KVM_SET_USER_MEMORY_REGION: %w", err)
	}
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		done <- runProbe(vmfd, runSize)
		unix.Close(int(vmfd))
		unix.Munmap(mem)
	}()
	select {
	case err := <-done:
		return err
	case <-time.After(kvmProbeTimeout):
		return fmt.Errorf("a guest did not run within %s", kvmProbeTimeout)
	}
}

// ioctl calls ioctl(2) with a pointer argument. The pointer is converted
// in the call itself, which keeps what it points to alive and in place
// for the call.
func ioctl(fd, req uintptr, arg unsafe.Pointer) (uintptr, error) {
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, fd, req, uintptr(arg))
	if errno != 0 {
		return 0, errno
	}
	return r, nil
}

// runProbe creates the vCPU of the VM vmfd, points it at the code and
// runs it to hlt. runSize is the size of the vCPU's shared run area.
func runProbe(vmfd, runSize uintptr) error {
	vcpu, err := ioctl(vmfd, kvmCreateVCPU, nil)
	if err != nil {
		return fmt.Errorf("KVM_CREATE_VCPU: %w", err)
	}
	defer unix.Close(int(vcpu))
	run, err := unix.Mmap(int(vcpu), 0, int(runSize), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return err
	}
	defer unix.Munmap(run)
	// Code segment at 0, real mode; the code at 0x1000.
	var sregs [0x138]byte
	if _, err := ioctl(vcpu, kvmGetSregs, unsafe.Pointer(&sregs[0])); err != nil {
		return fmt.Errorf("KVM_GET_SREGS: %w", err)
	}
	clear(sregs[0:8])   // cs.base
	clear(sregs[12:14]) // cs.selector
	if _, err := ioctl(vcpu, kvmSetSregs, unsafe.Pointer(&sregs[0])); err != nil {
		return fmt.Errorf("KVM_SET_SREGS: %w", err)
	}
	var regs [18]uint64
	if _, err := ioctl(vcpu, kvmGetRegs, unsafe.Pointer(&regs[0])); err != nil {
		return fmt.Errorf("KVM_GET_REGS: %w", err)
	}
	regs[16], regs[17] = 0x1000, 0x2 // rip, rflags
	if _, err := ioctl(vcpu, kvmSetRegs, unsafe.Pointer(&regs[0])); err != nil {
		return fmt.Errorf("KVM_SET_REGS: %w", err)
	}
	outs := 0
	for range 8 {
		if _, err := ioctl(vcpu, kvmRun, nil); errors.Is(err, unix.EINTR) {
			continue // a signal: run again
		} else if err != nil {
			return fmt.Errorf("KVM_RUN: %w", err)
		}
		switch reason := *(*uint32)(unsafe.Pointer(&run[8])); reason {
		case kvmExitIO:
			outs++
		case kvmExitHLT:
			if outs != 2 {
				return fmt.Errorf("the guest halted after %d of its 2 port writes", outs)
			}
			return nil
		default:
			return fmt.Errorf("the guest stopped with KVM exit reason %d", reason)
		}
	}
	return errors.New("the guest did not halt")
}

// cpuFeature is a CPUID bit the guest's CPU model (qemu64) needs.
type cpuFeature struct {
	name string
	leaf uint32
	reg  int // 0 eax, 1 ebx, 2 ecx, 3 edx
	bit  uint
}

var qemu64Features = []cpuFeature{
	{"sse3", 1, 2, 0}, {"cx16", 1, 2, 13},
	{"cx8", 1, 3, 8}, {"cmov", 1, 3, 15}, {"fxsr", 1, 3, 24}, {"sse", 1, 3, 25}, {"sse2", 1, 3, 26},
	{"syscall", 0x80000001, 3, 11}, {"nx", 0x80000001, 3, 20}, {"lm", 0x80000001, 3, 29},
}

// checkCPUID makes sure KVM offers guests the CPU features of qemu64.
// Some nested hosts open /dev/kvm and run guest code, but hide features
// such as SSE3 that every x86-64 CPU has; a Linux guest never boots there.
func checkCPUID(kvm uintptr) error {
	const n = 256
	type entry struct {
		function, index, flags, eax, ebx, ecx, edx uint32
		_                                          [3]uint32
	}
	var buf struct {
		nent, _ uint32
		entries [n]entry
	}
	buf.nent = n
	if _, err := ioctl(kvm, kvmGetSupportedCPUID, unsafe.Pointer(&buf)); err != nil {
		return fmt.Errorf("KVM_GET_SUPPORTED_CPUID: %w", err)
	}
	var missing []string
	for _, f := range qemu64Features {
		found := false
		for _, e := range buf.entries[:min(buf.nent, n)] {
			if e.function == f.leaf && e.index == 0 {
				found = [4]uint32{e.eax, e.ebx, e.ecx, e.edx}[f.reg]&(1<<f.bit) != 0
				break
			}
		}
		if !found {
			missing = append(missing, f.name)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("KVM hides CPU features every x86-64 guest expects (%v), as an incomplete nested hypervisor does", missing)
	}
	return nil
}
