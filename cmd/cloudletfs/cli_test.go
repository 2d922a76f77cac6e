package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cloudletfs/cloudletfs/overlay"
)

// env is one isolated cloudletfs: its own state dir and a base and custom
// VM on disk.
type env struct {
	t     *testing.T
	dir   string
	state string
}

func newEnv(t *testing.T) *env {
	e := &env{t: t, dir: t.TempDir()}
	e.state = filepath.Join(e.dir, "state-dir")
	rng := rand.New(rand.NewPCG(3, 4))
	random := func(n int) []byte { return randomBytes(rng, n) }
	bd, bm := random(64*4096), random(32*4096+100)
	cd := append([]byte(nil), bd...)
	copy(cd[4096*3:], random(4096*5)) // new data
	copy(cd[4096*10:], bm[:4096*2])   // copy of base memory
	clear(cd[4096*20 : 4096*22])      // zero
	cm := append(append([]byte(nil), bm...), random(9000)...)
	copy(cm[4096:], cd[4096*3:4096*4]) // repeat of new data
	for name, b := range map[string][]byte{
		"base/disk.img": bd, "base/memory.img": bm, "base/state": []byte("base state"),
		"app/disk.img": cd, "app/memory.img": cm, "app/state": []byte("app state"), "app/vm.json": []byte(`{"m":1}`),
	} {
		e.write(name, b)
	}
	return e
}

// randomBytes returns n bytes from rng.
func randomBytes(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := 0; i < n; i += 8 {
		v := rng.Uint64()
		for j := 0; j < 8 && i+j < n; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return b
}

// in returns e reporting to t, for use in a subtest.
func (e *env) in(t *testing.T) *env {
	c := *e
	c.t = t
	return &c
}

func (e *env) path(name string) string { return filepath.Join(e.dir, name) }

func (e *env) write(name string, b []byte) {
	e.t.Helper()
	p := e.path(name)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		e.t.Fatal(err)
	}
	if err := os.WriteFile(p, b, 0o644); err != nil {
		e.t.Fatal(err)
	}
}

func (e *env) read(name string) []byte {
	e.t.Helper()
	b, err := os.ReadFile(e.path(name))
	if err != nil {
		e.t.Fatal(err)
	}
	return b
}

// run runs cloudletfs in-process and returns stdout and the error.
func (e *env) run(args ...string) (string, error) {
	var stdout, stderr bytes.Buffer
	app := newApp(&stdout, &stderr)
	full := append([]string{"cloudletfs", "--state-dir", e.state}, args...)
	err := app.Run(interspersed(app, full))
	return stdout.String(), err
}

func (e *env) ok(args ...string) string {
	e.t.Helper()
	out, err := e.run(args...)
	if err != nil {
		e.t.Fatalf("cloudletfs %s: %v", strings.Join(args, " "), err)
	}
	return out
}

// fails runs a command that must fail with an error containing each of want.
func (e *env) fails(want []string, args ...string) {
	e.t.Helper()
	_, err := e.run(args...)
	if err == nil {
		e.t.Fatalf("cloudletfs %s succeeded, want an error", strings.Join(args, " "))
	}
	for _, w := range want {
		if !strings.Contains(err.Error(), w) {
			e.t.Fatalf("cloudletfs %s: error %q does not say %q", strings.Join(args, " "), err, w)
		}
	}
}

func (e *env) importBase(name, dir string) string {
	e.t.Helper()
	out := e.ok("base", "import", "--name", name, "--disk", e.path(dir+"/disk.img"),
		"--memory", e.path(dir+"/memory.img"), "--state", e.path(dir+"/state"))
	lines := strings.Split(strings.TrimSpace(out), "\n")
	id := lines[len(lines)-1]
	if _, err := overlay.ParseDigest(id); err != nil {
		e.t.Fatalf("last line of base import is %q, not an ID", id)
	}
	return id
}

func (e *env) create(out string, extra ...string) {
	e.t.Helper()
	args := append([]string{"overlay", "create", "--base", "base", "--disk", e.path("app/disk.img"),
		"--memory", e.path("app/memory.img"), "--state", e.path("app/state"), "--vm-config", e.path("app/vm.json"),
		"--segment-size", "16KiB", "-o", e.path(out)}, extra...)
	e.ok(args...)
}

// nothingAt asserts that a path does not exist and that its directory holds
// no leftover temporary files.
func (e *env) nothingAt(name string) {
	e.t.Helper()
	if _, err := os.Stat(e.path(name)); !os.IsNotExist(err) {
		e.t.Fatalf("%s exists after a failed command (%v)", name, err)
	}
	ents, _ := os.ReadDir(filepath.Dir(e.path(name)))
	for _, d := range ents {
		if strings.Contains(d.Name(), ".tmp-") {
			e.t.Fatalf("temporary file %s left behind", d.Name())
		}
	}
}

func TestEndToEnd(t *testing.T) {
	e := newEnv(t)
	id := e.importBase("base", "base")
	if out := e.ok("base", "list"); !strings.Contains(out, "base") || !strings.Contains(out, id[:12]) {
		t.Fatalf("base list does not show the base:\n%s", out)
	}
	e.create("app.overlay", "--codec", "zstd")
	out := e.ok("overlay", "info", "--json", e.path("app.overlay"))
	var info infoJSON
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatal(err)
	}
	if info.BaseID != id || info.ChunkSize != 4096 || info.Codecs["zstd"] == 0 || !info.HasVMConfig {
		t.Fatalf("info: %+v", info)
	}
	for _, k := range []string{"zero", "base-memory", "self", "data"} {
		if info.Chunks["disk"][k]+info.Chunks["memory"][k] == 0 {
			t.Errorf("no %s chunks in %v", k, info.Chunks)
		}
	}
	e.ok("overlay", "verify", e.path("app.overlay"))
	// Extract with the base found by the overlay's own base ID, and with
	// flags after the file as the usage line shows.
	e.ok("overlay", "extract", e.path("app.overlay"), "-o", e.path("out"))
	for _, f := range []string{"disk.img", "memory.img", "state", "vm.json"} {
		if !bytes.Equal(e.read("out/"+f), e.read("app/"+f)) {
			t.Fatalf("extracted %s differs", f)
		}
	}
	e.ok("base", "verify", "base")
	e.ok("base", "rm", id[:10])
	if out := e.ok("base", "list"); strings.Contains(out, id[:12]) {
		t.Fatalf("base still listed after rm:\n%s", out)
	}
}

func TestOrderTrace(t *testing.T) {
	e := newEnv(t)
	e.importBase("base", "base")
	e.write("trace", []byte("# resumed\n0.5 disk 7\n0.1 disk 5\n0.2 memory 1\n0.3 disk 5\n"))
	e.create("app.overlay", "--trace", e.path("trace"))
	o, f, err := openOverlay(e.path("app.overlay"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// disk 5 and 7 are new data; memory 1 repeats disk 3, which is not in
	// the trace, so it becomes data first and disk 3 refers to it.
	want := []overlay.ChunkID{{Image: overlay.Disk, Index: 5}, {Image: overlay.Memory, Index: 1}, {Image: overlay.Disk, Index: 7}}
	for i, c := range want {
		if o.Manifest.Order[i] != c {
			t.Fatalf("stream position %d holds %v, want %v (order %v)", i, o.Manifest.Order[i], c, o.Manifest.Order[:4])
		}
	}
}

func TestBadInput(t *testing.T) {
	e := newEnv(t)
	id := e.importBase("base", "base")
	e.create("good.overlay")
	good := e.read("good.overlay")
	o, err := overlay.Open(bytes.NewReader(good), int64(len(good)))
	if err != nil {
		t.Fatal(err)
	}
	h := o.Header
	seg := o.Manifest.Segments[1]
	flip := func(off int64) []byte {
		b := append([]byte(nil), good...)
		b[off] ^= 1
		return b
	}
	reseal := func(edit func(b []byte)) []byte {
		b := append([]byte(nil), good...)
		edit(b)
		sum := sha256.Sum256(b[:224])
		copy(b[224:256], sum[:])
		return b
	}
	manifestOff := int64(overlay.HeaderSize)
	stateOff := manifestOff + int64(h.Manifest.Stored)
	e.write("bad/truncated.overlay", good[:len(good)-10])
	e.write("bad/segment.overlay", flip(seg.Offset+10))
	e.write("bad/manifest.overlay", flip(manifestOff+5))
	e.write("bad/state.overlay", flip(stateOff+2))
	e.write("bad/absurd.overlay", reseal(func(b []byte) { binary.LittleEndian.PutUint64(b[80:], 1<<55) }))
	e.write("bad/hugeimage.overlay", reseal(func(b []byte) { binary.LittleEndian.PutUint64(b[24:], 1<<61) }))
	e.write("bad/version.overlay", reseal(func(b []byte) { b[8] = 3 }))
	e.write("empty.trace", []byte("# nothing\n\n"))
	e.write("beyond.trace", []byte("0 disk 1\n0.1 memory 999\n"))
	createArgs := func(out string, extra ...string) []string {
		return append([]string{"overlay", "create", "--base", "base", "--disk", e.path("app/disk.img"),
			"--memory", e.path("app/memory.img"), "--state", e.path("app/state"), "-o", e.path(out)}, extra...)
	}

	t.Run("missing file", func(t *testing.T) {
		e := e.in(t)
		args := createArgs("out/a.overlay")
		args[5] = e.path("app/nope.img")
		e.fails([]string{"nope.img", "no such file"}, args...)
		e.nothingAt("out/a.overlay")
	})
	t.Run("unreadable file", func(t *testing.T) {
		e := e.in(t)
		args := createArgs("out/a.overlay")
		args[7] = e.path("app") // a directory
		e.fails([]string{"memory", "app", "not a regular file"}, args...)
		e.nothingAt("out/a.overlay")
	})
	t.Run("import missing file", func(t *testing.T) {
		e := e.in(t)
		e.fails([]string{"state", "nope", "no such file"}, "base", "import", "--name", "x", "--disk", e.path("base/disk.img"),
			"--memory", e.path("base/memory.img"), "--state", e.path("base/nope"))
		e.fails([]string{"disk", "not a regular file"}, "base", "import", "--name", "x", "--disk", e.path("base"),
			"--memory", e.path("base/memory.img"), "--state", e.path("base/state"))
		if out := e.ok("base", "list"); strings.Contains(out, "x ") {
			t.Fatalf("a failed import registered a base:\n%s", out)
		}
	})
	t.Run("base not registered", func(t *testing.T) {
		e := e.in(t)
		args := createArgs("out/a.overlay")
		args[3] = "nosuchbase"
		e.fails([]string{`base "nosuchbase" is not in the registry`}, args...)
		e.nothingAt("out/a.overlay")
	})
	t.Run("empty trace", func(t *testing.T) {
		e := e.in(t)
		e.fails([]string{"empty.trace", "no accesses"}, createArgs("out/a.overlay", "--trace", e.path("empty.trace"))...)
		e.nothingAt("out/a.overlay")
	})
	t.Run("trace beyond image", func(t *testing.T) {
		e := e.in(t)
		e.fails([]string{"beyond.trace", "memory chunk 999", "beyond the image"}, createArgs("out/a.overlay", "--trace", e.path("beyond.trace"))...)
		e.nothingAt("out/a.overlay")
	})
	for name, want := range map[string][]string{
		"truncated": {"truncated"},
		"segment":   {"segment 1: sha256 mismatch"},
		"manifest":  {"manifest: sha256 mismatch"},
		"state":     {"state: sha256 mismatch"},
		"absurd":    {"manifest claims"},
		"hugeimage": {"memory size", "exceeds the limit"},
		"version":   {"format version 3 is not supported"},
	} {
		t.Run("extract "+name, func(t *testing.T) {
			e := e.in(t)
			file := e.path("bad/" + name + ".overlay")
			e.fails(append([]string{file}, want...), "overlay", "extract", file, "-o", e.path("x/"+name))
			e.nothingAt("x/" + name)
			if name != "segment" {
				e.fails(append([]string{file}, want...), "overlay", "info", file)
			}
			e.fails(append([]string{file}, want...), "overlay", "verify", file)
		})
	}
	t.Run("extract into an existing dir", func(t *testing.T) {
		e := e.in(t)
		e.write("keep/disk.img", []byte("old"))
		e.fails([]string{"segment 1"}, "overlay", "extract", e.path("bad/segment.overlay"), "-o", e.path("keep"))
		if string(e.read("keep/disk.img")) != "old" {
			t.Fatal("a failed extract replaced an existing file")
		}
		ents, _ := os.ReadDir(e.path("keep"))
		if len(ents) != 1 {
			t.Fatalf("a failed extract left %d files", len(ents))
		}
	})
	t.Run("another base", func(t *testing.T) {
		e := e.in(t)
		e.write("other/disk.img", e.read("app/disk.img"))
		e.write("other/memory.img", e.read("app/memory.img"))
		e.write("other/state", []byte("x"))
		e.importBase("other", "other")
		e.fails([]string{"built against base " + id[:12]}, "overlay", "extract", "--base", "other", e.path("good.overlay"), "-o", e.path("x/other"))
		e.nothingAt("x/other")
	})
	t.Run("base changed", func(t *testing.T) {
		e := e.in(t)
		e.write("changed/disk.img", e.read("base/disk.img"))
		e.write("changed/memory.img", e.read("base/memory.img"))
		e.write("changed/state", []byte("base state"))
		e.fails([]string{"already registered"}, "base", "import", "--name", "again", "--disk", e.path("changed/disk.img"),
			"--memory", e.path("changed/memory.img"), "--state", e.path("changed/state"))
		e.ok("base", "rm", "base")
		e.fails([]string{"needs base " + id, "not in the registry"}, "overlay", "extract", e.path("good.overlay"), "-o", e.path("x/gone"))
		e.nothingAt("x/gone")
		e.importBase("base", "changed")

		// Same size, other bytes, same modification time: only a full
		// re-hash can tell.
		p := e.path("changed/memory.img")
		st, _ := os.Stat(p)
		b := e.read("changed/memory.img")
		b[100] ^= 0xff
		e.write("changed/memory.img", b)
		if err := os.Chtimes(p, st.ModTime(), st.ModTime()); err != nil {
			t.Fatal(err)
		}
		e.fails([]string{"content changed since import", "memory"}, "base", "verify", "base")

		// A changed modification time is caught at every use.
		if err := os.Chtimes(p, time.Now(), time.Now()); err != nil {
			t.Fatal(err)
		}
		e.fails([]string{"memory", "changed since import"}, "overlay", "extract", e.path("good.overlay"), "-o", e.path("x/changed"))
		e.nothingAt("x/changed")
		e.fails([]string{"memory", "changed since import"}, createArgs("out/b.overlay")...)
		e.nothingAt("out/b.overlay")
	})
	t.Run("usage", func(t *testing.T) {
		e := e.in(t)
		e.fails([]string{"--codec"}, createArgs("out/c.overlay", "--codec", "gzip")...)
		e.fails([]string{"--segment-size"}, createArgs("out/c.overlay", "--segment-size", "lots")...)
		e.fails([]string{"want one overlay FILE"}, "overlay", "info")
		e.nothingAt("out/c.overlay")
	})
}
