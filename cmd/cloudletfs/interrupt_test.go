package main

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"
)

// createWatch reports on the returned channel the first name created in
// dir for which match holds. It uses inotify, so that the test acts on the
// event itself rather than on a poll that might miss a short-lived file.
func createWatch(t *testing.T, dir string, match func(name string) bool) <-chan string {
	t.Helper()
	fd, err := syscall.InotifyInit1(syscall.IN_CLOEXEC | syscall.IN_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "inotify")
	t.Cleanup(func() { f.Close() })
	if _, err := syscall.InotifyAddWatch(fd, dir, syscall.IN_CREATE); err != nil {
		t.Fatal(err)
	}
	found := make(chan string, 1)
	go func() {
		buf := make([]byte, 64<<10)
		for {
			n, err := f.Read(buf)
			if err != nil {
				return
			}
			for off := 0; off+syscall.SizeofInotifyEvent <= n; {
				ev := (*syscall.InotifyEvent)(unsafe.Pointer(&buf[off]))
				name := string(bytes.TrimRight(buf[off+syscall.SizeofInotifyEvent:off+syscall.SizeofInotifyEvent+int(ev.Len)], "\x00"))
				off += syscall.SizeofInotifyEvent + int(ev.Len)
				if match(name) {
					found <- name
					return
				}
			}
		}
	}()
	return found
}

// interruptWhenWriting starts cloudletfs with args, waits until it creates
// in dir a temporary file or directory, then sends it SIGINT. It wants the
// process to end with a non-zero status and one line on stderr that says it
// was interrupted, and nothing temporary left in dir.
func (e *env) interruptWhenWriting(dir string, args ...string) {
	t := e.t
	t.Helper()
	created := createWatch(t, dir, func(name string) bool {
		return strings.Contains(name, ".tmp-") || strings.HasPrefix(name, ".reorder-")
	})
	cmd := exec.Command(cloudletfsBinary(t), append([]string{"--state-dir", e.state}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() { cmd.Process.Kill() })
	select {
	case name := <-created:
		if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
			t.Fatalf("%s: SIGINT after %s appeared: %v", args[0], name, err)
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

// A long command that has nothing to clean up still stops on SIGINT: base
// import of a large image ends within a bound of the signal, non-zero,
// with one line, and registers nothing.
func TestInterruptBaseImport(t *testing.T) {
	e := newEnv(t)
	// Sparse: large to hash, nothing on disk.
	disk := e.path("huge/disk.img")
	e.write("huge/memory.img", make([]byte, 4096))
	e.write("huge/state", []byte("state"))
	f, err := os.Create(disk)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(64 << 30); err != nil {
		t.Fatal(err)
	}
	f.Close()
	cmd := exec.Command(cloudletfsBinary(t), "--state-dir", e.state, "base", "import", "--name", "huge",
		"--disk", disk, "--memory", e.path("huge/memory.img"), "--state", e.path("huge/state"))
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() { cmd.Process.Kill() })
	// It has started hashing once it holds the image open.
	fdDir := filepath.Join("/proc", fmt.Sprint(cmd.Process.Pid), "fd")
	for deadline := time.Now().Add(time.Minute); ; {
		opened := false
		ents, _ := os.ReadDir(fdDir)
		for _, ent := range ents {
			if target, _ := os.Readlink(filepath.Join(fdDir, ent.Name())); target == disk {
				opened = true
			}
		}
		if opened {
			break
		}
		select {
		case err := <-done:
			t.Fatalf("base import ended (%v) before it opened the image; stderr:\n%s", err, &stderr)
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatal("base import did not open the image within a minute")
		}
	}
	if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	select {
	case err = <-done:
	case <-time.After(10 * time.Second):
		t.Fatalf("base import did not end within 10 s of SIGINT")
	}
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() <= 0 {
		t.Errorf("exit %v after SIGINT, want a non-zero status; stdout:\n%s", err, &stdout)
	}
	msg := stderr.String()
	if strings.Count(msg, "\n") != 1 || !strings.Contains(msg, "stopped: interrupt") {
		t.Errorf("stderr %q, want one line that says it was stopped by the interrupt", msg)
	}
	if out := e.ok("base", "list"); strings.Contains(out, "huge") {
		t.Fatalf("an interrupted import registered the base:\n%s", out)
	}
}
