package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/cloudletfs/cloudletfs/overlay"
)

// outputs runs every command that writes files for the user, each into
// directories under root that do not exist yet, and returns the files
// written.
func (e *env) outputs(root string) []string {
	e.t.Helper()
	e.write("t.trace", []byte("0.1 disk 5\n0.2 memory 1\n"))
	tr := e.path("t.trace")
	ovl := filepath.Join(root, "a/b/app.overlay")
	e.create(strings.TrimPrefix(ovl, e.dir+"/"))
	re := filepath.Join(root, "c/d/re.overlay")
	e.ok("overlay", "reorder", ovl, "--trace", tr, "-o", re)
	ex := filepath.Join(root, "e/f")
	e.ok("overlay", "extract", ovl, "-o", ex)
	merged := filepath.Join(root, "g/h/merged.trace")
	e.ok("trace", "merge", tr, tr, "-o", merged)
	plot := filepath.Join(root, "i/j/plot.svg")
	e.ok("replay", "--overlay", ovl, "--trace", tr, "--plot", plot)
	files := []string{ovl, re, merged, plot}
	for _, f := range []string{overlay.DiskFile, overlay.MemoryFile, overlay.StateFile, overlay.VMConfigFile} {
		files = append(files, filepath.Join(ex, f))
	}
	return files
}

// TestOutputsHonourUmask: files the commands write are created 0666 less
// the umask, as cp or tar create them, so that a web server can read a
// fresh overlay; directories they create are 0777 less the umask.
func TestOutputsHonourUmask(t *testing.T) {
	for _, c := range []struct {
		umask      int
		file, dir  os.FileMode
		whatServer string
	}{
		{0o022, 0o644, 0o755, "readable by all"},
		{0o002, 0o664, 0o775, "writable by the group"},
	} {
		old := syscall.Umask(c.umask)
		e := newEnv(t)
		e.importBase("base", "base")
		files := e.outputs(e.path("out"))
		syscall.Umask(old)
		for _, f := range files {
			st, err := os.Stat(f)
			if err != nil {
				t.Fatal(err)
			}
			if st.Mode().Perm() != c.file {
				t.Errorf("umask %03o: %s is %v, want %v", c.umask, f, st.Mode().Perm(), c.file)
			}
			dst, err := os.Stat(filepath.Dir(f))
			if err != nil {
				t.Fatal(err)
			}
			if dst.Mode().Perm() != c.dir {
				t.Errorf("umask %03o: directory %s is %v, want %v", c.umask, filepath.Dir(f), dst.Mode().Perm(), c.dir)
			}
		}
	}
}

// TestOutputDirectories: every command that writes into a directory
// creates it and its missing parents (see outputs), and a command that
// fails removes again what it created, leaving no temporary files.
func TestOutputDirectories(t *testing.T) {
	e := newEnv(t)
	e.importBase("base", "base")
	e.outputs(e.path("out"))

	e.create("good.overlay")
	bad := e.corrupted(t, "good.overlay")
	e.write("bad.overlay", bad)
	e.write("t.trace", []byte("0.1 disk 5\n"))
	e.fails([]string{"segment 1"}, "overlay", "extract", e.path("bad.overlay"), "-o", e.path("new1/x/y"))
	e.fails([]string{"segment 1"}, "overlay", "reorder", e.path("bad.overlay"), "--trace", e.path("t.trace"), "-o", e.path("new2/x/r.overlay"))
	e.fails([]string{"not text"}, "trace", "merge", e.path("bad.overlay"), "-o", e.path("new3/x/m.trace"))
	for _, d := range []string{"new1", "new2", "new3"} {
		if _, err := os.Stat(e.path(d)); !os.IsNotExist(err) {
			t.Errorf("a failed command left %s behind (%v)", d, err)
		}
	}
	noTemps(t, e.dir)
}

// noTemps fails t if a temporary file or scratch directory is left
// anywhere under dir.
func noTemps(t *testing.T, dir string) {
	t.Helper()
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && (strings.Contains(d.Name(), ".tmp-") || strings.HasPrefix(d.Name(), ".reorder-") || strings.HasPrefix(d.Name(), ".unpack-")) {
			t.Errorf("temporary %s left behind", p)
		}
		return nil
	})
}

// TestReorderBlamesInput: a corrupt segment in the overlay being
// reordered is reported against that file, not the one being written.
func TestReorderBlamesInput(t *testing.T) {
	e := newEnv(t)
	e.importBase("base", "base")
	e.create("good.overlay")
	bad := e.corrupted(t, "good.overlay")
	e.write("in/bad.overlay", bad)
	e.write("t.trace", []byte("0.1 disk 5\n"))
	_, err := e.run("overlay", "reorder", e.path("in/bad.overlay"), "--trace", e.path("t.trace"), "-o", e.path("out/new.overlay"))
	if err == nil {
		t.Fatal("reorder of a corrupt overlay succeeded")
	}
	msg := err.Error()
	if !strings.HasPrefix(msg, "overlay "+e.path("in/bad.overlay")+": segment 1: sha256 mismatch") || strings.Contains(msg, "new.overlay") {
		t.Fatalf("error %q does not blame the input alone", msg)
	}
	e.nothingAt("out/new.overlay")
}

// TestExtractRemovesStaleVMConfig: extracting an overlay that carries no
// vm.json into a directory that holds one from another VM removes it, so
// that a launch from the directory does not take another VM's settings.
func TestExtractRemovesStaleVMConfig(t *testing.T) {
	e := newEnv(t)
	e.importBase("base", "base")
	e.create("with.overlay")
	e.ok("overlay", "create", "--base", "base", "--disk", e.path("app/disk.img"), "--memory", e.path("app/memory.img"),
		"--state", e.path("app/state"), "-o", e.path("without.overlay"))
	e.ok("overlay", "extract", e.path("with.overlay"), "-o", e.path("vm"))
	if !bytes.Equal(e.read("vm/vm.json"), e.read("app/vm.json")) {
		t.Fatal("vm.json not extracted")
	}
	e.ok("overlay", "extract", e.path("without.overlay"), "-o", e.path("vm"))
	if _, err := os.Stat(e.path("vm/vm.json")); !os.IsNotExist(err) {
		t.Fatalf("a stale vm.json is left beside the extracted VM (%v)", err)
	}
	if !bytes.Equal(e.read("vm/disk.img"), e.read("app/disk.img")) {
		t.Fatal("disk.img differs")
	}
}

// TestErrorsHideTempFiles fills the file system the outputs go to, a small
// tmpfs, and wants every error to name the file or directory the user gave,
// never a temporary one.
func TestErrorsHideTempFiles(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount a small tmpfs")
	}
	e := newEnv(t)
	e.importBase("base", "base")
	e.create("good.overlay")
	e.write("t.trace", []byte("0.1 disk 5\n"))
	var lines []byte
	for i := range 4000 {
		lines = append(lines, []byte("0.1 memory "+strconv.Itoa(i)+"\n")...)
	}
	e.write("big.trace", lines)
	full := e.path("full")
	if err := os.Mkdir(full, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("tmpfs", full, "tmpfs", 0, "size=16k"); err != nil {
		t.Skipf("cannot mount a tmpfs: %v", err)
	}
	t.Cleanup(func() { syscall.Unmount(full, syscall.MNT_DETACH) })
	for _, c := range []struct {
		args []string
		name string // the path the error must name
	}{
		{[]string{"overlay", "create", "--base", "base", "--disk", e.path("app/disk.img"), "--memory", e.path("app/memory.img"),
			"--state", e.path("app/state"), "-o", filepath.Join(full, "a.overlay")}, filepath.Join(full, "a.overlay")},
		{[]string{"overlay", "extract", e.path("good.overlay"), "-o", filepath.Join(full, "vm")}, filepath.Join(full, "vm")},
		{[]string{"overlay", "reorder", e.path("good.overlay"), "--trace", e.path("t.trace"), "-o", filepath.Join(full, "r.overlay")}, full},
		{[]string{"trace", "merge", e.path("big.trace"), "-o", filepath.Join(full, "m.trace")}, filepath.Join(full, "m.trace")},
	} {
		_, err := e.run(c.args...)
		if err == nil {
			t.Errorf("%s: succeeded on a full file system", strings.Join(c.args[:2], " "))
			continue
		}
		msg := err.Error()
		if !strings.Contains(msg, "no space left") || !strings.Contains(msg, c.name) || strings.Contains(msg, ".tmp-") ||
			strings.Contains(msg, ".reorder-") || strings.Contains(msg, ".unpack-") || strings.Contains(msg, ".segments") {
			t.Errorf("%s: error %q, want one about %s without temporary names", strings.Join(c.args[:2], " "), msg, c.name)
		}
		noTemps(t, full)
	}
}

// TestTraceOutFollowsTheRule: the trace a mount records at unmount is
// written like every other output: its directories made, umask honoured.
func TestTraceOutFollowsTheRule(t *testing.T) {
	requireFUSE(t)
	old := syscall.Umask(0o022)
	defer syscall.Umask(old)
	e := newEnv(t)
	e.importBase("base", "base")
	e.create("app.overlay")
	mnt := e.path("mnt")
	os.MkdirAll(mnt, 0o755)
	t.Cleanup(func() { syscall.Unmount(mnt, syscall.MNT_DETACH) })
	trace := e.path("traces/new/run.trace")
	m := e.mount("--trace-out", trace, e.path("app.overlay"), mnt)
	if _, err := os.ReadFile(filepath.Join(mnt, "disk", "image")); err != nil {
		t.Fatal(err)
	}
	e.ok("umount", mnt)
	if err := m.wait(t); err != nil {
		t.Fatalf("mount: %v; stderr:\n%s", err, m.errText())
	}
	st, err := os.Stat(trace)
	if err != nil || st.Mode().Perm() != 0o644 {
		t.Fatalf("--trace-out: %v, mode %v; want a 0644 file", err, st)
	}
	noTemps(t, e.path("traces"))
}

// corrupted returns the bytes of the overlay at name with one bit flipped
// inside segment 1.
func (e *env) corrupted(t *testing.T, name string) []byte {
	t.Helper()
	good := e.read(name)
	o, err := overlay.Open(bytes.NewReader(good), int64(len(good)))
	if err != nil {
		t.Fatal(err)
	}
	bad := append([]byte(nil), good...)
	bad[o.Manifest.Segments[1].Offset+10] ^= 1
	return bad
}
