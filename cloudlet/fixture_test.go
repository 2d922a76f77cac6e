package cloudlet_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/cloudletfs/cloudletfs/cloudlet"
	"github.com/cloudletfs/cloudletfs/overlay"
	"github.com/cloudletfs/cloudletfs/store"
)

// Sizes of the test base: small, whole chunks.
const (
	chunkSize = 4096
	diskSize  = 16 * chunkSize
	memSize   = 64 * chunkSize // the guest RAM admission counts
)

// cloudletUnderTest is a service behind a real HTTP server, and a client
// of it.
type cloudletUnderTest struct {
	svc    *cloudlet.Service
	srv    *httptest.Server
	client *cloudlet.Client
	opt    cloudlet.Options
}

// start runs a service with opt, filling in a state dir, a worker that
// exits at once and a quiet log where opt has none. The service and its
// server end with the test.
func start(t *testing.T, opt cloudlet.Options) *cloudletUnderTest {
	t.Helper()
	if opt.StateDir == "" {
		opt.StateDir = t.TempDir()
	}
	if opt.Worker == nil {
		opt.Worker = []string{"/bin/true"}
	}
	opt.Log = zerolog.Nop()
	svc, err := cloudlet.New(opt)
	if err != nil {
		t.Fatalf("cloudlet.New: %v", err)
	}
	srv := httptest.NewServer(svc.Handler())
	c, err := cloudlet.NewClient(srv.URL, opt.Token)
	if err != nil {
		t.Fatal(err)
	}
	u := &cloudletUnderTest{svc: svc, srv: srv, client: c, opt: opt}
	t.Cleanup(func() {
		u.stopLive(t)
		u.close(t)
	})
	return u
}

// stopLive stops the VMs that have not ended, so that no worker outlives
// the test.
func (u *cloudletUnderTest) stopLive(t *testing.T) {
	if u.svc == nil {
		return
	}
	for _, v := range u.svc.List() {
		if v.State.Final() {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		if _, err := u.svc.Stop(ctx, v.ID); err != nil {
			t.Errorf("stopping VM %s at the end of the test: %v", v.ID, err)
		}
		cancel()
	}
}

// close ends the server and the service, leaving the VMs' workers
// running; a second call does nothing.
func (u *cloudletUnderTest) close(t *testing.T) {
	if u.svc == nil {
		return
	}
	u.srv.Close()
	if err := u.svc.Close(); err != nil {
		t.Errorf("closing the service: %v", err)
	}
	u.svc = nil
}

// call sends a request to the service with the given body, token and
// content, and returns the status and the decoded error body (empty for a
// success).
func (u *cloudletUnderTest) call(t *testing.T, method, path, token, body string) (int, cloudlet.Error, http.Header) {
	t.Helper()
	req, err := http.NewRequest(method, u.srv.URL+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: reading the reply: %v", method, path, err)
	}
	var e cloudlet.Error
	if resp.StatusCode/100 != 2 {
		if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
			t.Fatalf("%s %s: %d with Content-Type %q, want application/json: %s", method, path, resp.StatusCode, ct, b)
		}
		if err := json.Unmarshal(b, &e); err != nil || e.Error == "" {
			t.Fatalf("%s %s: %d with a body that is not a JSON error (%v): %s", method, path, resp.StatusCode, err, b)
		}
	}
	return resp.StatusCode, e, resp.Header
}

// apiError asserts that err is the API's refusal with the status and
// field, and returns it.
func apiError(t *testing.T, what string, err error, status int, field string) *cloudlet.APIError {
	t.Helper()
	var ae *cloudlet.APIError
	if !errors.As(err, &ae) {
		t.Fatalf("%s: got %v, want an API error %d", what, err, status)
	}
	if ae.Status != status || ae.Field != field {
		t.Fatalf("%s: got HTTP %d field %q (%s), want HTTP %d field %q", what, ae.Status, ae.Field, ae.Msg, status, field)
	}
	return ae
}

// baseFiles writes the files of a base into dir: random disk and memory
// images from seed, a device state and, if runnable, a vm.json.
func baseFiles(t *testing.T, dir string, seed uint64, runnable bool) store.ImportFiles {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(seed, seed))
	files := store.ImportFiles{Disk: filepath.Join(dir, "disk.img"), Memory: filepath.Join(dir, "memory.img"), State: filepath.Join(dir, "state")}
	for path, n := range map[string]int{files.Disk: diskSize, files.Memory: memSize, files.State: 100} {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		if err := os.WriteFile(path, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if runnable {
		files.VMConfig = filepath.Join(dir, "vm.json")
		if err := os.WriteFile(files.VMConfig, []byte(`{"machine":"q35","memory_mib":1,"disk_interface":"virtio","nic":"e1000","guest_port":8080}`), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return files
}

// importBase registers a base in the store of stateDir.
func importBase(t *testing.T, stateDir, name string, files store.ImportFiles) *store.Base {
	t.Helper()
	st, err := store.Open(stateDir, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	b, err := st.Import(name, files, chunkSize, 2, nil)
	if err != nil {
		t.Fatalf("importing base %s: %v", name, err)
	}
	return b
}

// buildOverlay builds, against the base registered in stateDir, the
// overlay of a custom VM that differs from it in a few chunks chosen by
// seed, and returns the overlay's bytes.
func buildOverlay(t *testing.T, stateDir string, b *store.Base, seed uint64) []byte {
	t.Helper()
	st, err := store.Open(stateDir, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	ob, closeBase, err := st.Open(b)
	if err != nil {
		t.Fatal(err)
	}
	defer closeBase()
	var imgs [2][]byte
	for i, n := range []int64{diskSize, memSize} {
		imgs[i] = make([]byte, n)
		if _, err := ob.Images[i].ReadAt(imgs[i], 0); err != nil && err != io.EOF {
			t.Fatal(err)
		}
	}
	rng := rand.New(rand.NewPCG(seed, 7))
	for _, img := range imgs {
		for range 4 {
			off := rng.IntN(len(img)/chunkSize) * chunkSize
			for i := off; i < off+chunkSize; i++ {
				img[i] = byte(rng.Uint32())
			}
		}
	}
	out := filepath.Join(t.TempDir(), "vm.overlay")
	in := &overlay.Input{
		Images:   [2]io.ReaderAt{bytes.NewReader(imgs[0]), bytes.NewReader(imgs[1])},
		Sizes:    [2]int64{diskSize, memSize},
		State:    []byte(fmt.Sprintf("device state %d", seed)),
		VMConfig: []byte(`{"machine":"q35","memory_mib":1,"disk_interface":"virtio","nic":"e1000","guest_port":8080}`),
	}
	if _, err := overlay.Build(out, ob, in, overlay.BuildOptions{Codec: overlay.CodecZstd, Workers: 2}); err != nil {
		t.Fatalf("building an overlay: %v", err)
	}
	raw, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

// serveOverlays serves each overlay at its path, with Range support.
func serveOverlays(t *testing.T, files map[string][]byte) *httptest.Server {
	t.Helper()
	modTime := time.Now()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, ok := files[r.URL.Path]
		if !ok {
			http.NotFound(w, r)
			return
		}
		http.ServeContent(w, r, filepath.Base(r.URL.Path), modTime, bytes.NewReader(b))
	}))
	t.Cleanup(srv.Close)
	return srv
}

// follow follows the VM's events until it has ended, within timeout, and
// returns it as it ended.
func follow(t *testing.T, c *cloudlet.Client, id string, timeout time.Duration) cloudlet.VM {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	v, err := c.Follow(ctx, id, func(cloudlet.VM) bool { return true })
	if err != nil {
		t.Fatalf("following VM %s: %v (last seen: %s, %s)", id, err, v.State, v.Reason)
	}
	if !v.State.Final() {
		t.Fatalf("VM %s: the event stream ended with the VM %s", id, v.State)
	}
	return v
}
