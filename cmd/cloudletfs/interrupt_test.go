package main

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// holdOpens holds every open of a file in dir whose name matches, until
// hold(name) has returned, and lets every other open through. It uses
// fanotify permission events: the process that opens waits in the kernel,
// so the test acts while the file is being created, whatever the load.
// Without the privilege for fanotify the test is skipped.
func holdOpens(t *testing.T, dir string, match func(name string) bool, hold func(name string)) {
	t.Helper()
	fd, err := unix.FanotifyInit(unix.FAN_CLASS_CONTENT|unix.FAN_CLOEXEC|unix.FAN_NONBLOCK, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_LARGEFILE)
	if err != nil {
		t.Skipf("fanotify: %v", err)
	}
	if err := unix.FanotifyMark(fd, unix.FAN_MARK_ADD, unix.FAN_OPEN_PERM|unix.FAN_EVENT_ON_CHILD, unix.AT_FDCWD, dir); err != nil {
		unix.Close(fd)
		t.Skipf("fanotify on %s: %v", dir, err)
	}
	// Non-blocking, so the runtime's poller serves it and Close wakes the
	// reader.
	f := os.NewFile(uintptr(fd), "fanotify")
	ended := make(chan struct{})
	// Closing the group lets any open still held through, and ends the
	// reader.
	t.Cleanup(func() { f.Close(); <-ended })
	go func() {
		defer close(ended)
		buf := make([]byte, 4096)
		held := false
		for {
			n, err := f.Read(buf)
			if err != nil {
				return
			}
			for off := 0; off+int(unsafe.Sizeof(unix.FanotifyEventMetadata{})) <= n; {
				ev := (*unix.FanotifyEventMetadata)(unsafe.Pointer(&buf[off]))
				off += int(ev.Event_len)
				if ev.Fd < 0 {
					continue
				}
				name, _ := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", ev.Fd))
				if !held && match(filepath.Base(name)) {
					held = true
					hold(filepath.Base(name))
				}
				resp := unix.FanotifyResponse{Fd: ev.Fd, Response: unix.FAN_ALLOW}
				f.Write((*[unsafe.Sizeof(resp)]byte)(unsafe.Pointer(&resp))[:])
				unix.Close(int(ev.Fd))
			}
		}
	}()
}

// signalDelivered waits until no signal is pending for process pid: its
// handler has taken it.
func signalDelivered(pid int) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		if err != nil {
			return err
		}
		pending := false
		for _, l := range strings.Split(string(b), "\n") {
			if f := strings.Fields(l); len(f) == 2 && (f[0] == "SigPnd:" || f[0] == "ShdPnd:") && strings.Trim(f[1], "0") != "" {
				pending = true
			}
		}
		if !pending {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("a signal is still pending for pid %d after 10 s", pid)
		}
		runtime.Gosched()
	}
}

// interruptWhenWriting starts cloudletfs with args and, when it opens in
// dir a temporary file it is creating, holds that open until SIGINT has
// reached the process. It wants the process to end with a non-zero
// status and one line on stderr that says it was interrupted, and nothing
// temporary left in dir.
func (e *env) interruptWhenWriting(dir string, args ...string) {
	t := e.t
	t.Helper()
	cmd := exec.Command(cloudletfsBinary(t), append([]string{"--state-dir", e.state}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	created := make(chan string, 1)
	signalled := make(chan error, 1)
	holdOpens(t, dir, func(name string) bool {
		return strings.Contains(name, ".tmp-") || strings.HasPrefix(name, ".reorder-")
	}, func(name string) {
		created <- name
		err := cmd.Process.Signal(syscall.SIGINT)
		if err == nil {
			err = signalDelivered(cmd.Process.Pid)
		}
		signalled <- err
	})
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() { cmd.Process.Kill() })
	select {
	case name := <-created:
		if err := <-signalled; err != nil {
			t.Fatalf("%s: SIGINT while %s was being opened: %v", args[0], name, err)
		}
	case err := <-done:
		t.Fatalf("%s ended (%v) before it wrote anything; stderr:\n%s", strings.Join(args[:2], " "), err, &stderr)
	case <-time.After(2 * time.Minute):
		t.Fatalf("%s created nothing in %s within 2 minutes", strings.Join(args[:2], " "), dir)
	}
	var err error
	select {
	case err = <-done:
	case <-time.After(time.Minute):
		t.Fatalf("%s did not end within a minute of SIGINT", strings.Join(args[:2], " "))
	}
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() <= 0 {
		t.Errorf("%s: exit %v after SIGINT, want a non-zero status; stdout:\n%s", strings.Join(args[:2], " "), err, &stdout)
	}
	msg := stderr.String()
	if strings.Count(msg, "\n") != 1 || !strings.HasSuffix(msg, "\n") || !strings.Contains(msg, "interrupted") {
		t.Errorf("%s: stderr %q, want one line that says it was interrupted", strings.Join(args[:2], " "), msg)
	}
	noTemps(t, dir)
}

// TestInterruptLeavesNothing interrupts each command that writes a large
// file, once it has started writing, and wants nothing temporary left.
func TestInterruptLeavesNothing(t *testing.T) {
	e := newEnv(t)
	e.importBase("base", "base")
	// A custom VM of incompressible data: slow to compress with xz,
	// quick with zstd.
	rng := rand.New(rand.NewPCG(5, 6))
	e.write("big/disk.img", randomBytes(rng, 64<<20))
	e.write("big/memory.img", randomBytes(rng, 1<<20))
	e.write("big/state", []byte("state"))
	create := func(out string, extra ...string) []string {
		return append([]string{"overlay", "create", "--base", "base", "--disk", e.path("big/disk.img"),
			"--memory", e.path("big/memory.img"), "--state", e.path("big/state"), "-o", out}, extra...)
	}
	e.ok(create(e.path("big.overlay"), "--codec", "zstd")...)
	var trace bytes.Buffer
	for i := range 300_000 {
		fmt.Fprintf(&trace, "%d.%06d disk %d\n", i/1000, i%1000, i)
	}
	e.write("big.trace", trace.Bytes())
	e.write("small.trace", []byte("0 disk 1\n"))
	out := e.path("out")
	if err := os.Mkdir(out, 0o755); err != nil {
		t.Fatal(err)
	}

	t.Run("overlay create", func(t *testing.T) {
		e := e.in(t)
		e.interruptWhenWriting(out, create(filepath.Join(out, "new.overlay"), "--codec", "xz", "-j", "1")...)
		e.nothingAt("out/new.overlay")
	})
	t.Run("overlay extract", func(t *testing.T) {
		e := e.in(t)
		e.interruptWhenWriting(out, "overlay", "extract", "-j", "1", e.path("big.overlay"), "-o", out)
		if ents, _ := os.ReadDir(out); len(ents) != 0 {
			t.Fatalf("an interrupted extract left %d files in its directory", len(ents))
		}
	})
	t.Run("overlay reorder", func(t *testing.T) {
		e := e.in(t)
		e.interruptWhenWriting(out, "overlay", "reorder", "-j", "1", "--codec", "xz", e.path("big.overlay"),
			"--trace", e.path("small.trace"), "-o", filepath.Join(out, "re.overlay"))
		e.nothingAt("out/re.overlay")
	})
	t.Run("trace merge", func(t *testing.T) {
		e := e.in(t)
		e.interruptWhenWriting(out, "trace", "merge", e.path("big.trace"), "-o", filepath.Join(out, "m.trace"))
		e.nothingAt("out/m.trace")
	})
}

// interruptWhenOpen starts cloudletfs with args, sends SIGINT once the
// process holds file open, and wants it to end within 10 s, non-zero, with
// one line that says the interrupt stopped it.
func (e *env) interruptWhenOpen(file string, args ...string) {
	t := e.t
	t.Helper()
	cmd := exec.Command(cloudletfsBinary(t), append([]string{"--state-dir", e.state}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() { cmd.Process.Kill() })
	name := strings.Join(args[:2], " ")
	fdDir := filepath.Join("/proc", fmt.Sprint(cmd.Process.Pid), "fd")
	for deadline := time.Now().Add(time.Minute); ; {
		opened := false
		ents, _ := os.ReadDir(fdDir)
		for _, ent := range ents {
			if target, _ := os.Readlink(filepath.Join(fdDir, ent.Name())); target == file {
				opened = true
			}
		}
		if opened {
			break
		}
		select {
		case err := <-done:
			t.Fatalf("%s ended (%v) before it opened %s; stderr:\n%s", name, err, file, &stderr)
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not open %s within a minute", name, file)
		}
	}
	if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	var err error
	select {
	case err = <-done:
	case <-time.After(10 * time.Second):
		t.Fatalf("%s did not end within 10 s of SIGINT", name)
	}
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() <= 0 {
		t.Errorf("%s: exit %v after SIGINT, want a non-zero status; stdout:\n%s", name, err, &stdout)
	}
	msg := stderr.String()
	if strings.Count(msg, "\n") != 1 || !strings.Contains(msg, "stopped: interrupt") {
		t.Errorf("%s: stderr %q, want one line that says it was stopped by the interrupt", name, msg)
	}
}

// Long commands that have nothing to clean up still stop on SIGINT: base
// import and base verify of a large image end within a bound of the
// signal, non-zero, with one line; the import registers nothing.
func TestInterruptHashing(t *testing.T) {
	e := newEnv(t)
	e.importBase("base", "base")
	// Sparse: large to hash, nothing on disk.
	huge := func(path string) {
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if err := f.Truncate(64 << 30); err != nil {
			t.Fatal(err)
		}
	}
	disk := e.path("huge/disk.img")
	e.write("huge/memory.img", make([]byte, 4096))
	e.write("huge/state", []byte("state"))
	huge(disk)
	t.Run("base import", func(t *testing.T) {
		e := e.in(t)
		e.interruptWhenOpen(disk, "base", "import", "--name", "huge",
			"--disk", disk, "--memory", e.path("huge/memory.img"), "--state", e.path("huge/state"))
		if out := e.ok("base", "list"); strings.Contains(out, "huge") {
			t.Fatalf("an interrupted import registered the base:\n%s", out)
		}
	})
	t.Run("base verify", func(t *testing.T) {
		e := e.in(t)
		// The registered disk grows: verify hashes all of it.
		huge(e.path("base/disk.img"))
		e.interruptWhenOpen(e.path("base/disk.img"), "base", "verify", "base")
	})
}

// The first Ctrl-C asks a command to stop; once it has, the next one ends
// the process at once, whatever the command is stuck on. Here `trace
// merge` waits on a FIFO that never delivers, which nothing cancels.
func TestSecondInterruptKills(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "stuck.trace")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(cloudletfsBinary(t), "--state-dir", filepath.Join(dir, "state"), "trace", "merge", fifo, "-o", filepath.Join(dir, "m.trace"))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() { cmd.Process.Kill() })
	// A writer's open without blocking succeeds once the command has the
	// FIFO open to read; the writer then stays silent.
	var w *os.File
	for deadline := time.Now().Add(time.Minute); ; {
		f, err := os.OpenFile(fifo, os.O_WRONLY|syscall.O_NONBLOCK, 0)
		if err == nil {
			w = f
			break
		}
		if !errors.Is(err, syscall.ENXIO) || time.Now().After(deadline) {
			t.Fatalf("the command never opened the FIFO (%v); stderr:\n%s", err, &stderr)
		}
		select {
		case err := <-done:
			t.Fatalf("trace merge ended (%v) before it opened the FIFO; stderr:\n%s", err, &stderr)
		case <-time.After(10 * time.Millisecond):
		}
	}
	defer w.Close()
	if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	if err := signalDelivered(cmd.Process.Pid); err != nil {
		t.Fatal(err)
	}
	// Until the process ends: the first signal after the command has let
	// go of them takes the default action.
	var err error
	for deadline := time.Now().Add(10 * time.Second); ; {
		cmd.Process.Signal(syscall.SIGINT)
		select {
		case err = <-done:
		case <-time.After(100 * time.Millisecond):
			if time.Now().After(deadline) {
				t.Fatalf("trace merge, stuck on a FIFO, still runs after Ctrl-C twice and more for 10 s; stderr:\n%s", &stderr)
			}
			continue
		}
		break
	}
	ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus)
	if !ok || !ws.Signaled() || ws.Signal() != syscall.SIGINT {
		t.Fatalf("trace merge ended with %v, want killed by SIGINT; stderr:\n%s", err, &stderr)
	}
}
