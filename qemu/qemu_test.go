package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

func needQEMU(t *testing.T) string {
	bin, err := CheckBinary("")
	if err != nil {
		t.Skip(err)
	}
	return bin
}

// A QEMU with no guest at all is enough to exercise QMP.
func startBare(t *testing.T) *VM {
	bin := needQEMU(t)
	qmp := filepath.Join(t.TempDir(), "qmp.sock")
	vm, err := Start(context.Background(), bin, []string{"-machine", "none", "-display", "none", "-nodefaults",
		"-serial", "stdio", "-monitor", "none", "-qmp", "unix:" + qmp + ",server=on,wait=off"}, qmp, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { vm.Quit(context.Background()) })
	return vm
}

func TestQMPAgainstQEMU(t *testing.T) {
	vm := startBare(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	st, err := vm.QMP.Status(ctx)
	if err != nil || st != "running" {
		t.Fatalf("status %q, %v", st, err)
	}
	var qe *Error
	if _, err := vm.QMP.Execute(ctx, "no-such-command", nil); !errors.As(err, &qe) || qe.Class != "CommandNotFound" {
		t.Fatalf("unknown command: %v", err)
	}
	if _, err := vm.QMP.Execute(ctx, "stop", nil); err != nil {
		t.Fatal(err)
	}
	if e, err := vm.QMP.WaitEvent(ctx, "STOP"); err != nil || e.Name != "STOP" {
		t.Fatalf("STOP event: %v", err)
	}
	if st, _ := vm.QMP.Status(ctx); st != "paused" {
		t.Fatalf("status after stop: %q", st)
	}
	vm.Quit(ctx)
	select {
	case <-vm.Exited():
	default:
		t.Fatal("QEMU still running after quit")
	}
}

func TestQMPSocketThatNeverAnswers(t *testing.T) {
	path := filepath.Join(t.TempDir(), "silent.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close() // accept, then say nothing
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	start := time.Now()
	if _, err := Dial(ctx, path); err == nil || !strings.Contains(err.Error(), "greeting") {
		t.Fatalf("silent socket: %v", err)
	}
	if time.Since(start) > 5*time.Second {
		t.Fatal("Dial ignored its deadline")
	}
	ctx2, cancel2 := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel2()
	if _, err := Dial(ctx2, filepath.Join(t.TempDir(), "absent.sock")); err == nil || !strings.Contains(err.Error(), "never answered") {
		t.Fatalf("absent socket: %v", err)
	}
}

func TestConsoleTimeoutShowsLastLines(t *testing.T) {
	bin := needQEMU(t)
	qmp := filepath.Join(t.TempDir(), "qmp.sock")
	// QEMU with no guest prints nothing on its console, so nothing matches.
	vm, err := Start(context.Background(), bin, []string{"-machine", "none", "-display", "none", "-nodefaults",
		"-serial", "stdio", "-monitor", "none", "-qmp", "unix:" + qmp + ",server=on,wait=off"}, qmp, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Quit(context.Background())
	err = vm.WaitConsole(context.Background(), regexp.MustCompile("never"), 200*time.Millisecond)
	if err == nil || !strings.Contains(err.Error(), "did not match") || !strings.Contains(err.Error(), "last console lines") {
		t.Fatalf("got %v", err)
	}
}

func TestArgs(t *testing.T) {
	c := &Config{Machine: "pc", CPU: "qemu64", SMP: 1, MemoryMiB: 256, DiskIf: "virtio", NIC: "e1000", GuestPort: 8080,
		Kernel: "vmlinuz", Append: "console=ttyS0"}
	boot := strings.Join(c.Args(Run{Accel: "tcg", Memory: "/m,x", Share: true, Disk: "/d", QMP: "/q", Dir: "/b", Boot: true}), " ")
	for _, want := range []string{"mem-path=/m,,x,share=on", "-kernel /b/vmlinuz", "-append console=ttyS0", "-accel tcg", "memory-backend=ram"} {
		if !strings.Contains(boot, want) {
			t.Errorf("boot args lack %q: %s", want, boot)
		}
	}
	resume := strings.Join(c.Args(Run{Accel: "tcg", Memory: "/mnt/memory/image", Disk: "/mnt/disk/image", QMP: "/q", Incoming: true, HostPort: 5555}), " ")
	for _, want := range []string{"share=off", "-incoming defer", "hostfwd=tcp:127.0.0.1:5555-:8080"} {
		if !strings.Contains(resume, want) {
			t.Errorf("resume args lack %q: %s", want, resume)
		}
	}
	if strings.Contains(resume, "-kernel") {
		t.Errorf("resume boots a kernel: %s", resume)
	}
}

func TestAccelAndBinary(t *testing.T) {
	// Auto picks KVM exactly when the probe runs a guest on it; asking
	// for KVM where it fails names why.
	probe := probeKVM()
	t.Logf("KVM probe: %v", probe)
	if a, err := ResolveAccel("auto"); err != nil || (a == "kvm") != (probe == nil) || a != "kvm" && a != "tcg" {
		t.Fatalf("auto with KVM probe %v: %q %v", probe, a, err)
	}
	if _, err := ResolveAccel("kvm"); (err == nil) != (probe == nil) || err != nil && !strings.Contains(err.Error(), "KVM is not usable") {
		t.Fatalf("kvm with KVM probe %v: %v", probe, err)
	}
	if _, err := ResolveAccel("hvf"); err == nil {
		t.Fatal("unknown accelerator accepted")
	}
	if _, err := CheckBinary("/nonexistent/qemu"); err == nil || !strings.Contains(err.Error(), "not found") {
		t.Fatalf("missing binary: %v", err)
	}
	broken := filepath.Join(t.TempDir(), "qemu-broken")
	os.WriteFile(broken, []byte("#!/bin/sh\nexit 3\n"), 0o755)
	if _, err := CheckBinary(broken); err == nil || !strings.Contains(err.Error(), "does not run") {
		t.Fatalf("broken binary: %v", err)
	}
}

// Whatever a QMP peer sends, the client returns a reply or an error, and
// never panics or hangs past its deadline.
func FuzzQMPReplies(f *testing.F) {
	f.Add("{\"QMP\": {}}\n{\"return\": {}}\n{\"return\": {\"status\": \"running\"}}\n")
	f.Add("{\"QMP\": {}}\n{\"return\": {}}\n{\"event\": \"STOP\"}\n{\"error\": {\"class\": \"GenericError\", \"desc\": \"x\"}}\n")
	f.Add("{\"QMP\": {}}\n{\"return\": {}}\n{\"id\": 99, \"return\": 1}\nnot json\n")
	f.Fuzz(func(t *testing.T, script string) {
		a, b := net.Pipe()
		defer a.Close()
		go func() {
			defer b.Close()
			r := bufio.NewReader(b)
			lines := strings.SplitAfter(script, "\n")
			b.Write([]byte(lines[0]))
			for _, l := range lines[1:] {
				if _, err := r.ReadString('\n'); err != nil {
					return
				}
				b.Write([]byte(l))
			}
		}()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Millisecond)
		defer cancel()
		c := &Client{conn: a, r: bufio.NewReader(a)}
		if m, err := c.read(ctx); err != nil || m.QMP == nil {
			return
		}
		if _, err := c.Execute(ctx, "qmp_capabilities", nil); err != nil {
			return
		}
		c.Status(ctx)
	})
}

// Discard and the balloon are recorded in vm.json; a vm.json from before
// them gives the command line it always gave.
func TestArgsDiscardAndBalloon(t *testing.T) {
	old := []byte(`{"machine":"pc","cpu":"qemu64","smp":1,"memory_mib":256,"disk_interface":"virtio","nic":"e1000","guest_port":8080}`)
	c, err := LoadConfig(old)
	if err != nil {
		t.Fatal(err)
	}
	run := Run{Accel: "tcg", Memory: "/m", Disk: "/d", QMP: "/q", Incoming: true}
	want := []string{"-nodefaults", "-no-user-config", "-machine", "pc,memory-backend=ram", "-accel", "tcg", "-cpu", "qemu64",
		"-smp", "1", "-m", "256M", "-object", "memory-backend-file,id=ram,size=256M,mem-path=/m,share=off",
		"-drive", "file=/d,format=raw,if=virtio,cache=writeback", "-display", "none", "-serial", "stdio", "-monitor", "none",
		"-qmp", "unix:/q,server=on,wait=off", "-netdev", "user,id=net0", "-device", "e1000,netdev=net0", "-incoming", "defer"}
	if got := c.Args(run); strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("an old vm.json gives\n%q\nwant\n%q", got, want)
	}
	// Written back, it is the same vm.json: launch compares an overlay's
	// to its base's.
	if b, _ := json.Marshal(c); string(b) != string(old) {
		t.Fatalf("an old vm.json marshals as %s", b)
	}

	c.Discard, c.Balloon = true, true
	on := strings.Join(c.Args(run), " ")
	for _, want := range []string{"-drive file=/d,format=raw,if=virtio,cache=writeback,discard=unmap,detect-zeroes=unmap",
		"-device virtio-balloon-pci,id=balloon0,free-page-reporting=on"} {
		if !strings.Contains(on, want) {
			t.Errorf("args lack %q: %s", want, on)
		}
	}
	// NoDiscard keeps the hardware: the balloon stays, the drive ignores
	// discards.
	run.NoDiscard = true
	off := strings.Join(c.Args(run), " ")
	if strings.Contains(off, "discard=unmap") || strings.Contains(off, "detect-zeroes") || !strings.Contains(off, "virtio-balloon-pci") {
		t.Errorf("NoDiscard args: %s", off)
	}
	b, _ := json.Marshal(c)
	if back, err := LoadConfig(b); err != nil || !back.Discard || !back.Balloon {
		t.Fatalf("vm.json %s read back as %+v, %v", b, back, err)
	}
}

// Settle ends once the count has stood still, within the slack, for the
// quiet period after its last move, and at the limit if it never does.
func TestSettle(t *testing.T) {
	const quiet, poll = 200 * time.Millisecond, 5 * time.Millisecond
	// Moves by more than the slack for its first 100 ms, then by no more
	// than it.
	start := time.Now()
	var lastMove time.Time
	n := 0
	count := func() int {
		if time.Since(start) < 100*time.Millisecond {
			n += 10
			lastMove = time.Now()
		} else {
			n ^= 1
		}
		return n
	}
	s, err := Settle(context.Background(), count, quiet, 2, time.Minute, poll)
	if err != nil || !s.Quiet {
		t.Fatalf("settle: %+v, %v", s, err)
	}
	if end := time.Now(); end.Sub(lastMove) < quiet {
		t.Fatalf("settled %s after the last move, before the quiet period of %s", end.Sub(lastMove), quiet)
	}
	// Always moving: the limit ends it, not quiet.
	m := 0
	s, err = Settle(context.Background(), func() int { m += 100; return m }, quiet, 2, 300*time.Millisecond, poll)
	if err != nil || s.Quiet || s.Waited < 300*time.Millisecond {
		t.Fatalf("settle of a count that never stops: %+v, %v", s, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := Settle(ctx, func() int { return 0 }, quiet, 0, time.Minute, poll); !errors.Is(err, context.Canceled) {
		t.Fatalf("settle with its context cancelled: %v", err)
	}
}
