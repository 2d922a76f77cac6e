package main

import (
	"bytes"
	"context"
	"crypto/md5"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/cloudletfs/cloudletfs/launch"
	"github.com/cloudletfs/cloudletfs/order"
	"github.com/cloudletfs/cloudletfs/overlay"
	"github.com/cloudletfs/cloudletfs/qemu"
	"github.com/cloudletfs/cloudletfs/session"
	"github.com/cloudletfs/cloudletfs/store"
)

// guest builds (or reuses) the test guest from Debian packages.
func guest(t *testing.T) string {
	t.Helper()
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(root, "build", "guest")
	out, err := exec.Command(filepath.Join(root, "tools", "guest", "build.sh"), dir).CombinedOutput()
	if err != nil {
		t.Fatalf("building the guest: %v\n%s", err, out)
	}
	return dir
}

// The whole journey under TCG: build the guest, base create, overlay
// capture with a script, serve over an emulated slow link, launch --probe.
func TestQEMUEndToEnd(t *testing.T) {
	requireFUSE(t)
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Skip("needs qemu-system-x86_64 (make deps)")
	}
	g := guest(t)
	e := newEnv(t)
	bin := cloudletfsBinary(t)
	run := func(args ...string) (string, error) {
		cmd := exec.Command(bin, append([]string{"--state-dir", e.state}, args...)...)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	mustRun := func(args ...string) string {
		t.Helper()
		out, err := run(args...)
		if err != nil {
			t.Fatalf("cloudletfs %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return out
	}
	disk := filepath.Join(g, "disk.img")
	before := sha(t, disk)
	mustRun("base", "create", "--name", "guest", "--disk", disk, "--memory-size", "256MiB",
		"--kernel", filepath.Join(g, "vmlinuz"), "--initrd", filepath.Join(g, "initrd.img"),
		"--append", "console=ttyS0 quiet", "--ready", "^guest-ready", "--accel", "tcg")
	if sha(t, disk) != before {
		t.Fatal("base create modified the disk it was given")
	}

	t.Run("base create killed while its VM boots", func(t *testing.T) {
		// No mount here: QEMU ends because it dies with its parent.
		e := e.in(t)
		adoptOrphans(t)
		// At debug level the console goes to stderr: the guest's kernel
		// says when it runs.
		b := e.start("--log-level", "debug", "base", "create", "--name", "killed", "--disk", disk, "--memory-size", "256MiB",
			"--kernel", filepath.Join(g, "vmlinuz"), "--initrd", filepath.Join(g, "initrd.img"),
			"--append", "console=ttyS0", "--ready", "^no such line", "--ready-timeout", "10m", "--accel", "tcg")
		b.waitFor(t, "Linux version")
		killDaemon(t, b, qemuOf(t, b), "")
	})

	t.Run("ready never matches", func(t *testing.T) {
		out, err := run("base", "create", "--name", "never", "--disk", disk, "--memory-size", "256MiB",
			"--kernel", filepath.Join(g, "vmlinuz"), "--initrd", filepath.Join(g, "initrd.img"),
			"--append", "console=ttyS0", "--ready", "^no such line", "--ready-timeout", "3s", "--accel", "tcg")
		if err == nil || !strings.Contains(out, "did not match") || !strings.Contains(out, "last console lines") {
			t.Fatalf("got %v:\n%s", err, out)
		}
	})

	srvDir := filepath.Join(e.dir, "srv")
	os.MkdirAll(srvDir, 0o755)
	ovl := filepath.Join(srvDir, "app.overlay")
	captured := mustRun("overlay", "capture", "--base", "guest", "--script", filepath.Join(g, "app.script"),
		"--ready", "^app-ready", "--accel", "tcg", "-o", ovl)
	// The console log is for a capture that failed.
	if m := regexp.MustCompile(`its console goes to (\S+)`).FindStringSubmatch(captured); m == nil {
		t.Fatalf("the capture did not say where its console goes:\n%s", captured)
	} else if _, err := os.Stat(m[1]); !errors.Is(err, os.ErrNotExist) {
		os.Remove(m[1])
		t.Fatalf("a successful capture left its console log %s (%v)", m[1], err)
	}

	srv := e.start("serve", "--addr", "127.0.0.1:0", "--rate", "38mbit", "--rtt", "20ms", srvDir)
	url := strings.Fields(srv.line(t))[3] + "/app.overlay"
	trace := filepath.Join(e.dir, "launch.trace")
	probe := "curl -sf -m 1 http://127.0.0.1:$CLOUDLETFS_PORT/cgi-bin/app"
	out := mustRun("launch", "--accel", "tcg", "--probe", probe, "--exit-after-probe", "--trace-out", trace, url)
	// The answer depends on memory (a counter and a checksum kept in the
	// guest's RAM since customization) and on the custom disk. A probe that
	// timed out may still have reached the app, so the counter may be past 1.
	re := regexp.MustCompile(`first response: count=[1-9][0-9]* sum=[0-9a-f]{32} disk=hello from the custom disk`)
	for _, want := range []string{"metadata arrived", "QEMU running", "overlay complete"} {
		if !strings.Contains(out, want) {
			t.Fatalf("timeline lacks %q:\n%s", want, out)
		}
	}
	if !re.MatchString(out) {
		t.Fatalf("no first response from the guest:\n%s", out)
	}
	if b, err := os.ReadFile(trace); err != nil || !strings.Contains(string(b), " memory ") || !strings.Contains(string(b), " mark first-response") {
		t.Fatalf("launch trace: %v\n%.300s", err, b)
	}

	t.Run("reorder by the launch trace", func(t *testing.T) {
		re := filepath.Join(e.dir, "re.overlay")
		mustRun("overlay", "reorder", ovl, "--trace", trace, "--segment-size", "256KiB", "-o", re)
		// The same VM, byte for byte.
		mustRun("overlay", "extract", ovl, "-o", filepath.Join(e.dir, "x1"))
		mustRun("overlay", "extract", re, "-o", filepath.Join(e.dir, "x2"))
		for _, f := range []string{"disk.img", "memory.img", "state", "vm.json"} {
			if sha(t, filepath.Join(e.dir, "x1", f)) != sha(t, filepath.Join(e.dir, "x2", f)) {
				t.Fatalf("%s differs after reorder", f)
			}
		}
		// The full synthesis baseline: launch runs the extracted files.
		if out := mustRun("launch", "--accel", "tcg", "--probe", probe, "--exit-after-probe", filepath.Join(e.dir, "x1")); !strings.Contains(out, "local files of an extracted VM") || !strings.Contains(out, "first response: count=") {
			t.Fatalf("launch of the extracted VM:\n%s", out)
		}
		// Every chunk of the trace that carries data streams first, in
		// first-access order.
		tr, err := order.ParseFile(trace)
		if err != nil {
			t.Fatal(err)
		}
		o, f, err := openOverlay(re)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		pos := 0
		for _, c := range order.FirstAccess(tr.Accesses) {
			if o.Manifest.Refs[c.Image][c.Index].Kind != overlay.Data {
				continue
			}
			if o.Manifest.Order[pos] != c {
				t.Fatalf("stream position %d holds %v, want %v", pos, o.Manifest.Order[pos], c)
			}
			pos++
		}
		if pos == 0 {
			t.Fatal("the trace names no chunk that carries data")
		}
		// The tools around traces run on a real one.
		if out := mustRun("trace", "show", trace); !strings.Contains(out, "mark    first-response") {
			t.Fatalf("trace show:\n%s", out)
		}
		merged := filepath.Join(e.dir, "merged.trace")
		mustRun("trace", "merge", "--strategy", "median", trace, trace, "-o", merged)
		plot := filepath.Join(e.dir, "replay.svg")
		out := mustRun("replay", "--overlay", re, "--trace", merged, "--rate", "38mbit", "--rtt", "20ms", "--plot", plot)
		if !strings.Contains(out, "first response") || !strings.Contains(out, "physical limit") {
			t.Fatalf("replay:\n%s", out)
		}
		if b, err := os.ReadFile(plot); err != nil || !strings.HasPrefix(string(b), "<svg") {
			t.Fatalf("plot: %v", err)
		}
		if out := mustRun("replay", "--overlay", re, "--trace", trace, "--tune"); !strings.Contains(out, "4.0 MiB") || !strings.Contains(out, "64 KiB") {
			t.Fatalf("replay --tune:\n%s", out)
		}
	})

	t.Run("cloudlet service", func(t *testing.T) { testCloudlet(t, e.in(t), srvDir, url, ovl, trace) })
	t.Run("handoff between cloudlets", func(t *testing.T) { testHandoff(t, e.in(t), url) })
	t.Run("daemon killed under QEMU: launch", func(t *testing.T) { killUnderLaunch(t, e.in(t), url) })
	t.Run("daemon killed under QEMU: capture, then SIGTERM", func(t *testing.T) { killUnderCapture(t, e.in(t)) })

	wrote := false // a guest wrote to the disk through a mount of the overlay
	t.Run("kill -9 while the guest writes and fsyncs", func(t *testing.T) { wrote = guestCrash(t, e, srvDir, ovl) })

	t.Run("segments unavailable: QEMU gets I/O errors, not a hang", func(t *testing.T) {
		// A server that gives the metadata and answers 503 for every
		// segment: QEMU resumes, then its reads of guest memory and disk
		// fail with EIO one fetch timeout after they begin.
		o, f, err := openOverlay(ovl)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		meta := o.Header.MetadataLen()
		mustRun("cache", "rm", o.ID.String()) // the launch above cached every segment
		var refused atomic.Int64
		hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			var first int64
			if _, err := fmt.Sscanf(r.Header.Get("Range"), "bytes=%d-", &first); err == nil && first >= meta {
				refused.Add(1)
				http.Error(w, "segments unavailable", http.StatusServiceUnavailable)
				return
			}
			http.ServeContent(w, r, "app.overlay", time.Time{}, f)
		}))
		defer hs.Close()
		start := time.Now()
		out, err := run("launch", "--accel", "tcg", "--fetch-timeout", "2s", "--probe", probe, "--probe-timeout", "60s",
			"--exit-after-probe", hs.URL+"/app.overlay")
		took := time.Since(start)
		if err == nil {
			t.Fatalf("launch succeeded without segments:\n%s", out)
		}
		if !strings.Contains(out, "QEMU exited") || !strings.Contains(out, "the mount answered reads with EIO") {
			t.Fatalf("launch did not say that QEMU's reads failed:\n%s", out)
		}
		// The guest of the subtest before wrote files through its mount;
		// a launch resumes the saved state, so it starts without them.
		if wrote && !strings.Contains(out, "discarded data written by an earlier run") {
			t.Fatalf("launch kept what an earlier run wrote:\n%s", out)
		}
		if took > 30*time.Second {
			t.Fatalf("launch took %s to fail with a 2 s fetch timeout", took)
		}
		if refused.Load() == 0 {
			t.Fatal("no segment was asked for")
		}
		t.Logf("launch failed after %s, %d segment requests refused:\n%s", took.Round(time.Millisecond), refused.Load(), out)
	})

	t.Run("bad input stops before QEMU", func(t *testing.T) {
		for _, tc := range []struct {
			args []string
			want string
		}{
			{[]string{"launch", "--qemu", "/nonexistent/qemu-system-x86_64", url}, "not found"},
			{[]string{"launch", "--accel", "kvm", url}, "KVM is not usable"},
		} {
			if tc.want == "KVM is not usable" {
				if _, err := qemu.ResolveAccel("kvm"); err == nil {
					continue
				}
			}
			out, err := run(tc.args...)
			if err == nil || !strings.Contains(out, tc.want) {
				t.Errorf("%v: %v\n%s", tc.args, err, out)
			}
		}
		// A vm.json that does not match the base's QEMU configuration.
		var bases []struct {
			Disk, Memory, State struct{ Path string }
		}
		if err := json.Unmarshal([]byte(mustRun("base", "list", "--json")), &bases); err != nil || len(bases) == 0 {
			t.Fatalf("base list: %v", err)
		}
		b := bases[0]
		e.write("odd/vm.json", []byte(`{"machine":"pc","cpu":"qemu64","smp":1,"memory_mib":128,"disk_interface":"virtio"}`))
		mustRun("overlay", "create", "--base", "guest", "--disk", b.Disk.Path, "--memory", b.Memory.Path, "--state", b.State.Path,
			"--vm-config", e.path("odd/vm.json"), "--codec", "zstd", "-o", filepath.Join(srvDir, "odd.overlay"))
		out, err := run("launch", "--accel", "tcg", strings.TrimSuffix(url, "app.overlay")+"odd.overlay")
		if err == nil || !strings.Contains(out, "does not match base guest") {
			t.Errorf("mismatched vm.json: %v\n%s", err, out)
		}
		// An overlay for another base: a base of other files, named.
		e.write("other/disk.img", []byte("d"))
		e.write("other/memory.img", []byte("m"))
		e.write("other/state", []byte("s"))
		mustRun("base", "import", "--name", "other", "--disk", e.path("other/disk.img"),
			"--memory", e.path("other/memory.img"), "--state", e.path("other/state"))
		out, err = run("launch", "--base", "other", "--accel", "tcg", url)
		if err == nil || !strings.Contains(out, "built against base") {
			t.Errorf("overlay for another base: %v\n%s", err, out)
		}
	})
}

// guestCrash resumes the app VM under QEMU from a `cloudletfs mount` and
// has the guest write files and fsync each, printing its digest once the
// fsync has returned. The daemon is killed with SIGKILL after a random
// number of them. After a remount, every file the guest reported synced is
// in the disk image with its bytes, once e2fsck has replayed the journal.
// It reports whether the guest wrote through the mount.
func guestCrash(t *testing.T, e *env, srvDir, ovl string) bool {
	for _, tool := range []string{"e2fsck", "debugfs"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s (e2fsprogs)", tool)
		}
	}
	o, f, err := openOverlay(ovl)
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	cfg, err := qemu.LoadConfig(o.VMConfig)
	if err != nil {
		t.Fatal(err)
	}
	st, err := store.Open(e.state, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	rec, err := st.Resolve("guest")
	st.Close()
	if err != nil {
		t.Fatal(err)
	}
	_, baseDir, err := launch.BaseConfig(rec)
	if err != nil {
		t.Fatal(err)
	}
	srv := e.start("serve", "--addr", "127.0.0.1:0", srvDir)
	url := strings.Fields(srv.line(t))[3] + "/app.overlay"
	mnt := e.path("crash-mnt")
	os.MkdirAll(mnt, 0o755)
	t.Cleanup(func() { syscall.Unmount(mnt, syscall.MNT_DETACH) })
	// --fresh: the earlier launches' writes do not belong under the saved
	// state this VM resumes from.
	m := e.mount("--fresh", url, mnt)

	qmp := filepath.Join(e.dir, "crash-qmp.sock")
	var out bytes.Buffer
	console := &lockedWriter{w: &out}
	port, err := launch.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	args := cfg.Args(qemu.Run{Accel: "tcg", Memory: filepath.Join(mnt, "memory", "image"), Disk: filepath.Join(mnt, "disk", "image"),
		QMP: qmp, Incoming: true, HostPort: port, Dir: baseDir})
	ctx := context.Background()
	vm, err := qemu.Start(ctx, "", args, qmp, console)
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Kill()
	if err := vm.Resume(ctx, filepath.Join(mnt, "state")); err != nil {
		t.Fatal(err)
	}
	// Each file: 64 KiB, written and fsynced by dd, then its digest.
	// Kernel messages are kept off the console, where they could split a
	// line.
	vm.Type("\ndmesg -n 1; i=0; while :; do i=$((i+1)); dd if=/dev/urandom of=/mnt/w$i bs=4k count=16 conv=fsync 2>/dev/null || break; echo \"synced $i $(md5sum </mnt/w$i)\"; done\n")
	killAt := 3 + rand.IntN(10)
	if err := vm.WaitConsole(ctx, regexp.MustCompile(fmt.Sprintf(`^synced %d [0-9a-f]{32}`, killAt)), 60*time.Second); err != nil {
		t.Fatal(err)
	}
	m.cmd.Process.Signal(syscall.SIGKILL)
	m.wait(t)
	vm.Kill()
	console.mu.Lock()
	synced := regexp.MustCompile(`(?m)^synced (\d+) ([0-9a-f]{32})`).FindAllStringSubmatch(out.String(), -1)
	console.mu.Unlock()
	if len(synced) < killAt {
		t.Fatalf("%d files reported synced, want at least %d", len(synced), killAt)
	}

	// The remount cleans the dead mount and shows what was written.
	m = e.mount(url, mnt)
	b, err := os.ReadFile(filepath.Join(mnt, "disk", "image"))
	if err != nil {
		t.Fatal(err)
	}
	e.ok("umount", mnt)
	m.wait(t)
	img := e.path("crash-disk.img")
	if err := os.WriteFile(img, b, 0o644); err != nil {
		t.Fatal(err)
	}
	// e2fsck replays the journal as the guest's next boot would; it exits
	// 1 when it has fixed something, which a replay counts as.
	if out, err := exec.Command("e2fsck", "-fy", img).CombinedOutput(); err != nil {
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() > 1 {
			t.Fatalf("e2fsck: %v\n%s", err, out)
		}
	}
	for _, s := range synced {
		got, err := exec.Command("debugfs", "-R", "cat /w"+s[1], img).Output()
		if err != nil {
			t.Fatalf("debugfs cat /w%s: %v", s[1], err)
		}
		if sum := fmt.Sprintf("%x", md5.Sum(got)); sum != s[2] || len(got) != 64<<10 {
			t.Fatalf("file w%s after the kill: %d bytes, md5 %s; the guest synced 65536 bytes, md5 %s", s[1], len(got), sum, s[2])
		}
	}
	t.Logf("daemon killed after the guest's fsync %d; all %d files it reported synced are intact", killAt, len(synced))
	return true
}

// qemuBound is how soon QEMU must be gone once its daemon was killed: the
// kernel ends the FUSE connection with the daemon's last descriptor, and
// QEMU is killed with its parent.
const qemuBound = 20 * time.Second

// adoptOrphans makes this process the reaper of the processes its
// children leave behind, so that a QEMU whose daemon was killed can be
// waited for, until the test ends.
func adoptOrphans(t *testing.T) {
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		t.Skipf("cannot become a subreaper: %v", err)
	}
	t.Cleanup(func() { unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0) })
}

// qemuOf returns the pid of the QEMU process p started.
func qemuOf(t *testing.T, p *proc) int {
	t.Helper()
	pid := findQEMU(p)
	if pid == 0 {
		t.Fatalf("process %d runs no QEMU", p.cmd.Process.Pid)
	}
	return pid
}

// findQEMU returns the pid of the QEMU process p started, or 0. QEMU may
// be the child of any thread of p.
func findQEMU(p *proc) int {
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", p.cmd.Process.Pid))
	for _, task := range tasks {
		b, _ := os.ReadFile(task)
		for _, f := range strings.Fields(string(b)) {
			pid, _ := strconv.Atoi(f)
			// The VM, not `qemu-system-x86_64 --version`.
			if args, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); bytes.Contains(args, []byte("\x00-qmp\x00")) {
				return pid
			}
		}
	}
	return 0
}

// killDaemon kills p with SIGKILL and waits until the QEMU it ran (from
// the mount at mnt, if not "") has exited, every thread of it, and been
// reaped here; it fails the test if that takes longer than qemuBound. A
// QEMU that hangs is freed by aborting the FUSE connection of mnt, so
// that the test leaves nothing behind.
func killDaemon(t *testing.T, p *proc, qemuPid int, mnt string) {
	t.Helper()
	conn := ""
	if mnt != "" {
		conn = fuseConnection(t, mnt)
	}
	p.cmd.Process.Signal(syscall.SIGKILL)
	// Every thread of the daemon is gone once QEMU is handed to this
	// process. The daemon's pipes may stay open for as long as QEMU
	// lives, so they cannot tell.
	deadline := time.Now().Add(30 * time.Second)
	for ppid(qemuPid) != os.Getpid() {
		if time.Now().After(deadline) {
			t.Fatalf("QEMU (pid %d) was not handed over after its daemon was killed", qemuPid)
		}
		time.Sleep(10 * time.Millisecond)
	}
	start := time.Now()
	reaped := make(chan error, 1)
	var ws syscall.WaitStatus
	go func() {
		_, err := syscall.Wait4(qemuPid, &ws, 0, nil)
		reaped <- err
	}()
	select {
	case err := <-reaped:
		if err != nil {
			t.Fatalf("waiting for QEMU (pid %d): %v", qemuPid, err)
		}
		how := fmt.Sprintf("with status %d", ws.ExitStatus())
		if ws.Signaled() {
			how = "on " + ws.Signal().String()
		}
		t.Logf("QEMU ended %s %s after its daemon was killed", how, time.Since(start).Round(time.Millisecond))
		p.wait(t)
	case <-time.After(qemuBound):
		if mnt != "" {
			abortFUSE(t, conn)
		}
		syscall.Kill(qemuPid, syscall.SIGKILL)
		<-reaped
		if mnt != "" {
			syscall.Unmount(mnt, syscall.MNT_DETACH)
		}
		t.Fatalf("QEMU (pid %d) still ran %s after its daemon was killed", qemuPid, qemuBound)
	}
}

// ppid returns the parent of process pid, or 0.
func ppid(pid int) int {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	_, after, _ := strings.Cut(string(b), "\nPPid:")
	n, _ := strconv.Atoi(strings.TrimSpace(strings.SplitN(after, "\n", 2)[0]))
	return n
}

// fuseConnection returns the number of the FUSE connection behind the
// mount at mnt: the minor device number in mountinfo.
func fuseConnection(t *testing.T, mnt string) string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == mnt {
			_, minor, _ := strings.Cut(f[2], ":")
			return minor
		}
	}
	t.Fatalf("%s is not mounted", mnt)
	return ""
}

// abortFUSE ends FUSE connection conn through the fusectl file system,
// mounting it if it is not.
func abortFUSE(t *testing.T, conn string) {
	const ctl = "/sys/fs/fuse/connections"
	if _, err := os.Stat(filepath.Join(ctl, conn)); err != nil {
		if err := syscall.Mount("fusectl", ctl, "fusectl", 0, ""); err == nil {
			defer syscall.Unmount(ctl, 0)
		}
	}
	if err := os.WriteFile(filepath.Join(ctl, conn, "abort"), []byte("1"), 0); err != nil {
		t.Logf("could not abort FUSE connection %s: %v", conn, err)
	}
}

// lineWith waits for a line of p's stdout that holds want.
func (p *proc) lineWith(t *testing.T, want string) string {
	t.Helper()
	for {
		if l := p.line(t); strings.Contains(l, want) {
			return l
		}
	}
}

// killUnderLaunch kills `launch` under its running VM: QEMU exits within
// the bound, and the next `launch` cleans the dead mount. Stopped with
// SIGTERM, that one quits QEMU, then unmounts, never under QEMU.
func killUnderLaunch(t *testing.T, e *env, url string) {
	adoptOrphans(t)
	started := func() (*proc, int, string) {
		l := e.start("launch", "--accel", "tcg", url)
		l.lineWith(t, "QEMU running")
		pid := qemuOf(t, l)
		cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		m := regexp.MustCompile(`mem-path=([^,\x00]+)/memory/image`).FindSubmatch(cmdline)
		if m == nil {
			t.Fatalf("no mount in QEMU's command line %q", cmdline)
		}
		return l, pid, string(m[1])
	}
	l, pid, dead := started()
	killDaemon(t, l, pid, dead)
	if fstype, _ := session.MountType(dead); fstype != session.FSType {
		t.Fatalf("after the kill %s holds %q, want the dead cloudletfs mount", dead, fstype)
	}

	l, pid, mnt := started()
	if fstype, _ := session.MountType(dead); fstype != "" {
		t.Fatalf("the next launch left the killed one's dead %s mount", fstype)
	}
	if _, err := os.Stat(dead); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the next launch left the killed one's mountpoint %s (%v)", dead, err)
	}
	if !strings.Contains(l.errText(), "cleaned a dead mount") {
		t.Fatalf("the next launch did not say it cleaned a dead mount:\n%s", l.errText())
	}
	l.cmd.Process.Signal(syscall.SIGTERM)
	l.lineWith(t, "stopping on a signal")
	l.wait(t)
	if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
		t.Fatalf("QEMU (pid %d) is still there after launch stopped", pid)
	}
	if strings.Contains(l.errText(), "detaching the mount lazily") {
		t.Fatalf("launch unmounted under its QEMU:\n%s", l.errText())
	}
	if fstype, _ := session.MountType(mnt); fstype != "" {
		t.Fatalf("launch stopped by SIGTERM left its %s mount", fstype)
	}
}

// killUnderCapture kills a scripted `overlay capture` under its running
// VM: QEMU exits within the bound. The next capture cleans what the
// killed one left in the state dir, shows the guest's console in a log
// and its progress while it waits, and stopped with SIGTERM, stops its
// QEMU, unmounts and leaves nothing behind.
func killUnderCapture(t *testing.T, e *env) {
	adoptOrphans(t)
	t.Cleanup(func() {
		// What a failing run leaves, once its processes are killed.
		mnts, _ := filepath.Glob(filepath.Join(e.state, "capture-*", "mnt"))
		for _, mnt := range mnts {
			syscall.Unmount(mnt, syscall.MNT_DETACH)
		}
	})
	e.write("wait.script", []byte("echo capture-script-ran\n"))
	capture := func() *proc {
		return e.start("overlay", "capture", "--base", "guest", "--script", e.path("wait.script"),
			"--ready", "^no such line", "--ready-timeout", "10m", "--accel", "tcg", "-o", e.path("never.overlay"))
	}
	works := func() []string {
		w, _ := filepath.Glob(filepath.Join(e.state, "capture-*"))
		return w
	}
	c := capture()
	c.lineWith(t, "the VM is running")
	left := works()
	if len(left) != 1 {
		t.Fatalf("the running capture has %v in the state dir, want its work directory", left)
	}
	killDaemon(t, c, qemuOf(t, c), filepath.Join(left[0], "mnt"))
	if w := works(); len(w) != 1 || w[0] != left[0] {
		t.Fatalf("the killed capture left %v in the state dir, want its work directory %s", w, left[0])
	}

	c = capture()
	running := c.lineWith(t, "the VM is running")
	if w := works(); len(w) != 1 || w[0] == left[0] {
		t.Fatalf("the next capture left the killed one's work directory: %v", w)
	}
	if fstype, _ := session.MountType(filepath.Join(left[0], "mnt")); fstype != "" {
		t.Fatalf("the killed capture's %s mount is still there", fstype)
	}
	logPath := running[strings.LastIndex(running, " ")+1:]
	t.Cleanup(func() { os.Remove(logPath) })
	if l := c.lineWith(t, "waiting for --ready"); !strings.Contains(l, "chunks written") {
		t.Fatalf("progress line %q", l)
	}
	deadline := time.Now().Add(60 * time.Second)
	for b, _ := os.ReadFile(logPath); !strings.Contains(string(b), "capture-script-ran"); b, _ = os.ReadFile(logPath) {
		if time.Now().After(deadline) {
			t.Fatalf("the console log %s never showed the script's output:\n%s", logPath, b)
		}
		time.Sleep(100 * time.Millisecond)
	}
	pid := qemuOf(t, c)
	work := works()
	c.cmd.Process.Signal(syscall.SIGTERM)
	if err := c.wait(t); err == nil {
		t.Fatal("a capture stopped by SIGTERM exited 0")
	}
	if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
		var ws syscall.WaitStatus
		if got, _ := syscall.Wait4(pid, &ws, syscall.WNOHANG, nil); got != pid {
			t.Fatalf("QEMU (pid %d) still runs after its capture stopped", pid)
		}
		t.Fatalf("the capture exited without waiting for its QEMU (pid %d)", pid)
	}
	if fstype, _ := session.MountType(filepath.Join(work[0], "mnt")); fstype != "" {
		t.Fatalf("the stopped capture left its %s mount", fstype)
	}
	if w := works(); len(w) != 0 {
		t.Fatalf("the stopped capture left %v", w)
	}
	if !strings.Contains(c.errText(), "stopped: terminated signal received") {
		t.Fatalf("the stopped capture did not say why it stopped:\n%s", c.errText())
	}
}
