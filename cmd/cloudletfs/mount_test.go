package main

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cloudletfs/cloudletfs/order"
	"github.com/cloudletfs/cloudletfs/session"
)

var (
	binOnce sync.Once
	binPath string
	binErr  error
)

// TestMain runs the tests, then removes the binary they built.
func TestMain(m *testing.M) {
	// Everything the tests and the commands they run put in the temp dir
	// (among them what a daemon killed on purpose cannot clean: its QMP
	// socket, a capture's console log) goes with one directory.
	tmp, err := os.MkdirTemp("", "cloudletfs-cmd-tests")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	// Open to all, as /tmp is: a test runs commands as another user.
	if err := os.Chmod(tmp, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Setenv("TMPDIR", tmp)
	code := m.Run()
	os.RemoveAll(tmp)
	os.Exit(code)
}

// cloudletfsBinary builds the cloudletfs command once for tests that need
// it as a separate process; TestMain removes it once the tests have run.
func cloudletfsBinary(t *testing.T) string {
	t.Helper()
	binOnce.Do(func() {
		dir, err := os.MkdirTemp("", "cloudletfs-bin")
		if err != nil {
			binErr = err
			return
		}
		binPath = filepath.Join(dir, "cloudletfs")
		out, err := exec.Command("go", "build", "-o", binPath, ".").CombinedOutput()
		if err != nil {
			binErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return binPath
}

// proc is a cloudletfs process whose first stdout line we wait for.
type proc struct {
	cmd    *exec.Cmd
	lines  chan string
	stderr *bytes.Buffer
	errw   *lockedWriter
	done   chan error
}

// errText returns what the process has written to stderr so far.
func (p *proc) errText() string {
	p.errw.mu.Lock()
	defer p.errw.mu.Unlock()
	return p.stderr.String()
}

func (e *env) start(args ...string) *proc {
	e.t.Helper()
	cmd := exec.Command(cloudletfsBinary(e.t), append([]string{"--state-dir", e.state}, args...)...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		e.t.Fatal(err)
	}
	p := &proc{cmd: cmd, lines: make(chan string, 100), stderr: &bytes.Buffer{}, done: make(chan error, 1)}
	p.errw = &lockedWriter{w: p.stderr}
	cmd.Stderr = p.errw
	if err := cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			p.lines <- sc.Text()
		}
		close(p.lines)
		p.done <- cmd.Wait()
	}()
	e.t.Cleanup(func() { cmd.Process.Kill() })
	return p
}

// requireFUSE skips a test that needs to mount.
func requireFUSE(t *testing.T) {
	t.Helper()
	if _, err := os.Stat("/dev/fuse"); err != nil || os.Geteuid() != 0 {
		t.Skip("needs root and /dev/fuse")
	}
}

// mount starts `cloudletfs mount` with args and waits for its ready line.
func (e *env) mount(args ...string) *proc {
	e.t.Helper()
	m := e.start(append([]string{"mount"}, args...)...)
	if l := m.line(e.t); !strings.HasPrefix(l, "ready in ") {
		e.t.Fatalf("mount %v printed %q; stderr:\n%s", args, l, m.errText())
	}
	return m
}

// line waits for the next line of stdout.
func (p *proc) line(t *testing.T) string {
	t.Helper()
	select {
	case l, ok := <-p.lines:
		if !ok {
			t.Fatalf("process ended without output; stderr:\n%s", p.stderr)
		}
		return l
	case <-time.After(30 * time.Second):
		t.Fatalf("no output within 30s; stderr:\n%s", p.stderr)
	}
	return ""
}

// wait waits for the process to exit.
func (p *proc) wait(t *testing.T) error {
	t.Helper()
	deadline := time.After(30 * time.Second)
	for {
		select {
		case _, more := <-p.lines:
			if more {
				continue
			}
		case <-deadline:
			t.Fatalf("process did not exit within 30s; stderr:\n%s", p.errText())
		}
		break
	}
	select {
	case err := <-p.done:
		return err
	case <-deadline:
		t.Fatalf("process did not exit within 30s; stderr:\n%s", p.errText())
	}
	return nil
}

type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

func sha(t *testing.T, path string) [32]byte {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

func TestMountCommand(t *testing.T) {
	requireFUSE(t)
	e := newEnv(t)
	e.importBase("base", "base")
	e.create("srv/app.overlay")
	baseSums := map[string][32]byte{}
	for _, f := range []string{"base/disk.img", "base/memory.img", "base/state"} {
		baseSums[f] = sha(t, e.path(f))
	}

	srv := e.start("serve", "--addr", "127.0.0.1:0", "--rate", "50mbit", "--rtt", "1ms", e.path("srv"))
	url := strings.Fields(srv.line(t))[3] + "/app.overlay" // "serving DIR on http://ADDR (...)"
	if !strings.HasPrefix(url, "http://127.0.0.1:") {
		t.Fatalf("serve printed %q", url)
	}
	mnt := e.path("mnt")
	os.MkdirAll(mnt, 0o755)
	t.Cleanup(func() { syscall.Unmount(mnt, syscall.MNT_DETACH) })

	t.Run("missing mountpoint", func(t *testing.T) {
		e := e.in(t)
		e.fails([]string{"does not exist"}, "mount", url, e.path("nowhere"))
	})

	trace := e.path("run.trace")
	m := e.mount("--trace-out", trace, url, mnt)
	t.Run("busy mountpoint", func(t *testing.T) {
		e := e.in(t)
		// The running mount holds the state dir, so check with another.
		e.state = e.path("other-state")
		e.fails([]string{"busy"}, "mount", url, mnt)
	})
	t.Run("overlay already mounted", func(t *testing.T) {
		e := e.in(t)
		other := e.path("mnt2")
		os.MkdirAll(other, 0o755)
		e.fails([]string{"already mounted by another cloudletfs process"}, "mount", url, other)
		if fstype, _ := session.MountType(other); fstype != "" {
			t.Fatal("a refused mount left a mount behind")
		}
	})
	if out := e.ok("status", "--once", mnt); !strings.Contains(out, "segments") {
		t.Fatalf("status: %q", out)
	}
	want := e.read("app/disk.img")
	got, err := os.ReadFile(filepath.Join(mnt, "disk", "image"))
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("disk through the mount differs (%v)", err)
	}

	// Write and fsync, then kill the daemon without warning.
	f, err := os.OpenFile(filepath.Join(mnt, "disk", "image"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	patch := []byte("durable once fsynced")
	if _, err := f.WriteAt(patch, 5000); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	copy(want[5000:], patch)
	m.cmd.Process.Signal(syscall.SIGKILL)
	m.wait(t)

	// The remount cleans the dead mount, says so, and has the write.
	m = e.mount("--trace-out", trace, url, mnt)
	got, err = os.ReadFile(filepath.Join(mnt, "disk", "image"))
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("after kill -9 and remount the disk differs (%v)", err)
	}
	e.ok("umount", mnt)
	if err := m.wait(t); err != nil {
		t.Fatalf("mount exited with %v after umount; stderr:\n%s", err, m.stderr)
	}
	if !strings.Contains(m.errText(), "cleaned a dead mount") {
		t.Fatalf("the remount did not name the dead mount; stderr:\n%s", m.errText())
	}
	acc, err := order.ParseFile(trace)
	if err != nil || len(acc.Accesses) == 0 {
		t.Fatalf("--trace-out: %v", err)
	}

	for f, sum := range baseSums {
		if sha(t, e.path(f)) != sum {
			t.Fatalf("%s changed", f)
		}
	}

	// The cache of the overlay is listed, can be removed, and the data
	// written through the mount survives its removal.
	out := e.ok("cache", "ls")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 3 || !strings.HasPrefix(lines[2], "total") {
		t.Fatalf("cache ls:\n%s", out)
	}
	id := strings.Fields(lines[1])[0]
	e.ok("cache", "rm", id[:10])
	if out := e.ok("cache", "ls"); strings.Contains(out, id) {
		t.Fatalf("cache still listed after rm:\n%s", out)
	}
	// A cap smaller than the overlay: its cache stays while mounted and
	// goes when the mount ends; the written data stays.
	for range 2 {
		m = e.mount("--cache-size", "1KiB", url, mnt)
		got, err = os.ReadFile(filepath.Join(mnt, "disk", "image"))
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("after cache rm the disk differs (%v)", err)
		}
		if out := e.ok("cache", "ls"); !strings.Contains(out, id) || !strings.Contains(out, "yes") {
			t.Fatalf("the mounted overlay's cache is not listed as mounted:\n%s", out)
		}
		e.ok("umount", mnt)
		if err := m.wait(t); err != nil {
			t.Fatalf("mount exited with %v; stderr:\n%s", err, m.errText())
		}
		if out := e.ok("cache", "ls"); strings.Contains(out, id) {
			t.Fatalf("the cache over --cache-size stayed after the mount ended:\n%s", out)
		}
	}

	t.Run("base changed or missing", func(t *testing.T) {
		e := e.in(t)
		now := time.Now()
		os.Chtimes(e.path("base/state"), now, now)
		e.fails([]string{"state", "changed since import"}, "mount", url, mnt)
		e.ok("base", "rm", "base")
		e.fails([]string{"not in the registry"}, "mount", url, mnt)
		if fstype, _ := session.MountType(mnt); fstype != "" {
			t.Fatal("a refused mount left a mount behind")
		}
	})
	srv.cmd.Process.Signal(syscall.SIGTERM)
	if err := srv.wait(t); err != nil {
		t.Fatalf("serve exited with %v", err)
	}
	if !strings.Contains(srv.stderr.String(), "range=") {
		t.Fatalf("serve logged no requests:\n%s", srv.stderr)
	}
}

// A mount is private to the user who made it unless --allow-other is given.
func TestMountIsPrivate(t *testing.T) {
	requireFUSE(t)
	e := newEnv(t)
	e.importBase("base", "base")
	e.create("srv/app.overlay")
	srv := e.start("serve", "--addr", "127.0.0.1:0", e.path("srv"))
	url := strings.Fields(srv.line(t))[3] + "/app.overlay"
	// Another user must be able to reach the mountpoint itself.
	top, err := os.MkdirTemp("", "cloudletfs-private-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(top) })
	mnt := filepath.Join(top, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	os.Chmod(top, 0o755)
	t.Cleanup(func() { syscall.Unmount(mnt, syscall.MNT_DETACH) })
	// readAs reads the disk image as the user nobody.
	readAs := func() ([]byte, error) {
		cmd := exec.Command("cat", filepath.Join(mnt, "disk", "image"))
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		var errb bytes.Buffer
		cmd.Stderr = &errb
		out, err := cmd.Output()
		if err != nil {
			return nil, fmt.Errorf("%v: %s", err, strings.TrimSpace(errb.String()))
		}
		return out, nil
	}
	want := e.read("app/disk.img")
	for _, allow := range []bool{false, true} {
		args := []string{url, mnt}
		if allow {
			args = []string{"--allow-other", url, mnt}
		}
		m := e.mount(args...)
		if got, err := os.ReadFile(filepath.Join(mnt, "disk", "image")); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("the mounting user cannot read the disk (%v)", err)
		}
		got, err := readAs()
		switch {
		case !allow && (err == nil || !strings.Contains(err.Error(), "Permission denied")):
			t.Fatalf("another user read a private mount: %v", err)
		case allow && (err != nil || !bytes.Equal(got, want)):
			t.Fatalf("with --allow-other another user cannot read the disk: %v", err)
		}
		e.ok("umount", mnt)
		if err := m.wait(t); err != nil {
			t.Fatalf("mount exited with %v", err)
		}
	}
}

// Credentials given to a mount reach the server and appear nowhere a user
// or a log collector can see: not in the mount's log (at debug level), its
// stats or event streams, the server's request log, or an error.
func TestCredentialsNeverShown(t *testing.T) {
	requireFUSE(t)
	const secret = "s3cret-token-4711"
	e := newEnv(t)
	e.importBase("base", "base")
	e.create("srv/app.overlay")
	srv := e.start("--log-level", "debug", "serve", "--addr", "127.0.0.1:0", "--token", secret, e.path("srv"))
	url := strings.Fields(srv.line(t))[3] + "/app.overlay"
	withPassword := strings.Replace(url, "://", "://user:"+secret+"@", 1)
	mnt := e.path("mnt")
	os.MkdirAll(mnt, 0o755)
	t.Cleanup(func() { syscall.Unmount(mnt, syscall.MNT_DETACH) })

	// Refused without the token, and with a wrong one: the error names
	// the problem, not the secret.
	for _, args := range [][]string{{withPassword, mnt}, {"--header", "Authorization: Bearer wrong-" + secret, url, mnt}} {
		_, err := e.run(append([]string{"mount"}, args...)...)
		if err == nil || strings.Contains(err.Error(), secret) || !strings.Contains(err.Error(), "credentials") {
			t.Fatalf("mount %v: %v", args[:len(args)-1], err)
		}
	}
	m := e.start("--log-level", "debug", "mount", "--header", "Authorization: Bearer "+secret, withPassword, mnt)
	if l := m.line(t); !strings.HasPrefix(l, "ready in ") || strings.Contains(l, secret) {
		t.Fatalf("mount printed %q", l)
	}
	seen := map[string][]byte{"ready line": nil}
	for _, name := range []string{"stats", "vm.json", "streams/io", "streams/chunks_fetched", "disk/image"} {
		b, err := os.ReadFile(filepath.Join(mnt, name))
		if err != nil {
			t.Fatal(err)
		}
		seen[name] = b
	}
	if !bytes.Equal(seen["disk/image"], e.read("app/disk.img")) {
		t.Fatal("the disk differs through a mount with credentials")
	}
	seen["status"] = []byte(e.ok("status", "--once", mnt))
	e.ok("umount", mnt)
	if err := m.wait(t); err != nil {
		t.Fatalf("mount exited with %v", err)
	}
	srv.cmd.Process.Signal(syscall.SIGTERM)
	srv.wait(t)
	seen["mount log"], seen["serve log"] = []byte(m.errText()), []byte(srv.errText())
	if !strings.Contains(m.errText(), "DBG") {
		t.Fatalf("the mount logged nothing at debug level:\n%s", m.errText())
	}
	for what, b := range seen {
		if bytes.Contains(b, []byte(secret)) {
			t.Errorf("the secret appears in the %s", what)
		}
	}
}

// umount leaves alone what is not a cloudletfs mount, and says so.
func TestUmountOnlyCloudletfs(t *testing.T) {
	requireFUSE(t)
	e := newEnv(t)
	dir := e.path("tmpfs")
	os.MkdirAll(dir, 0o755)
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size=1m"); err != nil {
		t.Skipf("cannot mount a tmpfs: %v", err)
	}
	t.Cleanup(func() { syscall.Unmount(dir, syscall.MNT_DETACH) })
	e.fails([]string{"not a cloudletfs mount but tmpfs"}, "umount", dir)
	// Through a symlink, the mount it points to is the one looked at.
	if err := os.Symlink("tmpfs", e.path("to-tmpfs")); err != nil {
		t.Fatal(err)
	}
	e.fails([]string{"not a cloudletfs mount but tmpfs"}, "umount", e.path("to-tmpfs"))
	if fstype, _ := session.MountType(dir); fstype != "tmpfs" {
		t.Fatalf("the tmpfs is gone after a refused umount (%q)", fstype)
	}
	e.importBase("base", "base")
	e.create("app.overlay")
	mnt := e.path("mnt")
	os.MkdirAll(mnt, 0o755)
	t.Cleanup(func() { syscall.Unmount(mnt, syscall.MNT_DETACH) })
	m := e.mount(e.path("app.overlay"), mnt)
	if err := os.Symlink(mnt, e.path("link")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("link", e.path("link2")); err != nil {
		t.Fatal(err)
	}
	e.ok("umount", e.path("link2"))
	if err := m.wait(t); err != nil {
		t.Fatalf("mount after umount through a symlink: %v", err)
	}
	if fstype, _ := session.MountType(mnt); fstype != "" {
		t.Fatalf("still mounted (%s) after umount through a symlink", fstype)
	}
}

// waitFor waits until the process's stderr holds want.
func (p *proc) waitFor(t *testing.T, want string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(p.errText(), want) {
		if time.Now().After(deadline) {
			t.Fatalf("stderr never said %q:\n%s", want, p.errText())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// SIGTERM on a mount whose files a process holds does not detach it under
// that process: the daemon names the holder and serves on. A second
// signal within a few seconds forces the unmount; a stop once the holder
// is gone unmounts at once.
func TestSignalOnHeldMount(t *testing.T) {
	requireFUSE(t)
	e := newEnv(t)
	e.importBase("base", "base")
	e.create("srv/app.overlay")
	mnt := e.path("mnt")
	os.MkdirAll(mnt, 0o755)
	want := e.read("app/disk.img")
	hold := func() *exec.Cmd {
		f, err := os.Open(filepath.Join(mnt, "disk", "image"))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		h := exec.Command("sleep", "600")
		h.Stdin = f
		if err := h.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { h.Process.Kill(); h.Wait() })
		return h
	}
	for _, force := range []bool{true, false} {
		m := e.mount(e.path("srv/app.overlay"), mnt)
		h := hold()
		m.cmd.Process.Signal(syscall.SIGTERM)
		m.waitFor(t, fmt.Sprintf("sleep (pid %d)", h.Process.Pid))
		// The second signal goes at once: it forces only within a few
		// seconds of the refusal.
		if force {
			m.cmd.Process.Signal(syscall.SIGTERM)
		}
		if !strings.Contains(m.errText(), "not unmounting") {
			t.Fatalf("the refusal does not say the mount stays:\n%s", m.errText())
		}
		if !force {
			got, err := os.ReadFile(filepath.Join(mnt, "disk", "image"))
			if err != nil || !bytes.Equal(got, want) {
				t.Fatalf("the mount stopped serving after the first signal (%v)", err)
			}
			h.Process.Kill()
			h.Wait()
			m.cmd.Process.Signal(syscall.SIGTERM)
		}
		if err := m.wait(t); err != nil {
			t.Fatalf("mount exited with %v; stderr:\n%s", err, m.errText())
		}
		if lazy := strings.Contains(m.errText(), "detaching the mount lazily"); lazy != force {
			t.Fatalf("holder still there: %v, detached lazily: %v; stderr:\n%s", force, lazy, m.errText())
		}
		if fstype, _ := session.MountType(mnt); fstype != "" {
			t.Fatalf("%s still mounted after the daemon exited", fstype)
		}
	}
}
