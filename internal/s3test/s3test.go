// Package s3test runs a real S3-compatible server, SeaweedFS, on 127.0.0.1
// for tests: Start builds it once (tools/s3/build.sh, cached under
// <repo>/build/s3), runs it on free ports with three identities, makes a
// bucket, and stops it when the test ends. A server that cannot be built or
// started fails the test, with the reason; it is never skipped.
package s3test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// Key is one identity's access key pair.
type Key struct {
	Name      string
	AccessKey string
	SecretKey string
}

// Server is a running SeaweedFS with its S3 gateway.
type Server struct {
	// URL is the S3 endpoint, http://127.0.0.1:PORT, for AWS_ENDPOINT_URL_S3.
	URL    string
	Region string
	// Bucket is made at start, empty.
	Bucket string
	// Admin may do anything; Put and MakeBucket sign with it.
	Admin Key
	// Readers are two identities that may only read and list.
	Readers [2]Key

	config string // the -s3.config file
	keys   []Key  // the identities the config file holds now
	cmd    *exec.Cmd
	exited chan struct{}
	log    string
}

// Region is the region the tests sign for. SeaweedFS serves any.
const Region = "us-east-1"

// startTimeout bounds the wait for a started server's S3 gateway to serve
// requests; it answers in about 4 s on an idle machine.
const startTimeout = 90 * time.Second

var (
	buildOnce sync.Once
	weedPath  string
	buildErr  error // set before built is closed
)

// Start runs a SeaweedFS server for t, stopped (killed) in t.Cleanup.
func Start(t testing.TB) *Server {
	t.Helper()
	weed := build(t)
	s := &Server{Region: Region, Bucket: "overlays",
		Admin:   newKey("admin"),
		Readers: [2]Key{newKey("reader1"), newKey("reader2")}}
	s.keys = []Key{s.Admin, s.Readers[0], s.Readers[1]}
	dir := t.TempDir()
	s.config = filepath.Join(dir, "s3.json")
	if err := s.writeConfig(); err != nil {
		t.Fatalf("s3test: %v", err)
	}
	start := time.Now()
	var err error
	// Free ports are found by binding and letting go, so another process
	// may take one before weed binds it; weed then exits, and is run
	// again on other ports.
	for try := 1; ; try++ {
		err = s.run(t, weed, dir, try)
		if err == nil || try == 3 || !errors.Is(err, errExited) {
			break
		}
	}
	if err != nil {
		t.Fatalf("s3test: %v", err)
	}
	s.MakeBucket(t, s.Bucket)
	s.awaitWritable(t)
	t.Logf("s3test: SeaweedFS serves S3 at %s, bucket %s, %.1f s after start", s.URL, s.Bucket, time.Since(start).Seconds())
	return s
}

// errExited: weed exited before its S3 gateway answered.
var errExited = errors.New("weed exited")

// run starts weed on free ports and waits until S3 answers.
func (s *Server) run(t testing.TB, weed, dir string, try int) error {
	data := filepath.Join(dir, fmt.Sprintf("data%d", try))
	if err := os.Mkdir(data, 0o755); err != nil {
		return err
	}
	ports, err := freePorts(8)
	if err != nil {
		return err
	}
	s.URL = fmt.Sprintf("http://127.0.0.1:%d", ports[0])
	s.log = filepath.Join(dir, fmt.Sprintf("weed%d.log", try))
	logf, err := os.Create(s.log)
	if err != nil {
		return err
	}
	defer logf.Close()
	p := func(i int) string { return strconv.Itoa(ports[i]) }
	s.cmd = exec.Command(weed, "server", "-dir="+data, "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
		"-s3", "-s3.port="+p(0), "-s3.port.grpc="+p(1), "-s3.config="+s.config,
		// Both are on by default, on fixed ports.
		"-s3.port.iceberg=0", "-s3.port.lance=0",
		"-master.port="+p(2), "-master.port.grpc="+p(3),
		"-volume.port="+p(4), "-volume.port.grpc="+p(5),
		"-filer.port="+p(6), "-filer.port.grpc="+p(7),
		// Volumes are small files in a temp dir, not 30 GB ones.
		"-master.volumeSizeLimitMB=64",
		// A test reports nothing to seaweedfs.com.
		"-master.telemetry=false")
	s.cmd.Stdout, s.cmd.Stderr = logf, logf
	// weed goes with the test binary, even one killed by a timeout.
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := s.cmd.Start(); err != nil {
		return fmt.Errorf("starting %s: %w", weed, err)
	}
	s.exited = make(chan struct{})
	cmd, exited := s.cmd, s.exited
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() { stop(t, cmd, exited) })
	return s.awaitReady(exited)
}

// stop kills weed. It takes more than 7 s to exit on SIGTERM, and its data
// dir is thrown away with the test, so there is nothing to wait for.
func stop(t testing.TB, cmd *exec.Cmd, exited <-chan struct{}) {
	cmd.Process.Signal(syscall.SIGKILL)
	select {
	case <-exited:
	case <-time.After(10 * time.Second):
		t.Errorf("s3test: weed (pid %d) still running 10 s after SIGKILL", cmd.Process.Pid)
	}
}

// awaitReady polls the S3 gateway until it answers a signed request, weed
// exits, or startTimeout passes.
func (s *Server) awaitReady(exited <-chan struct{}) error {
	c, err := s.client(s.Admin)
	if err != nil {
		return err
	}
	deadline := time.Now().Add(startTimeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, err = c.BucketExists(ctx, "probe")
		cancel()
		if err == nil {
			return nil
		}
		select {
		case <-exited:
			return fmt.Errorf("%w (%s) before S3 answered at %s:\n%s", errExited, s.cmd.ProcessState, s.URL, s.logTail())
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("S3 at %s did not answer within %s (last: %v):\n%s", s.URL, startTimeout, err, s.logTail())
		}
	}
}

// logTail is the end of weed's log, for a failure message.
func (s *Server) logTail() string {
	b, err := os.ReadFile(s.log)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-30):], "\n")
}

// Client returns a minio-go client of the server signing as k.
func (s *Server) Client(t testing.TB, k Key) *minio.Client {
	t.Helper()
	c, err := s.client(k)
	if err != nil {
		t.Fatalf("s3test: %v", err)
	}
	return c
}

func (s *Server) client(k Key) (*minio.Client, error) {
	return minio.New(strings.TrimPrefix(s.URL, "http://"), &minio.Options{
		Creds:        credentials.NewStaticV4(k.AccessKey, k.SecretKey, ""),
		Region:       s.Region,
		BucketLookup: minio.BucketLookupPath,
	})
}

// MakeBucket makes a bucket, trying again while the server is still
// setting up its filer (a fresh server refuses the first writes for a
// moment).
func (s *Server) MakeBucket(t testing.TB, name string) {
	t.Helper()
	c := s.Client(t, s.Admin)
	deadline := time.Now().Add(startTimeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := c.MakeBucket(ctx, name, minio.MakeBucketOptions{Region: s.Region})
		cancel()
		if err == nil {
			return
		}
		if code := minio.ToErrorResponse(err).Code; code == "BucketAlreadyOwnedByYou" || code == "BucketAlreadyExists" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("s3test: making bucket %s at %s: %v\n%s", name, s.URL, err, s.logTail())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// awaitWritable waits until an object can be written. A fresh server
// answers S3 seconds before its filer has joined the cluster and takes
// writes (about 10 s after start); the first write waits that out, and is
// done here so that the test's first Put is as quick as the others.
func (s *Server) awaitWritable(t testing.TB) {
	t.Helper()
	c := s.Client(t, s.Admin)
	const probe = "s3test-ready"
	deadline := time.Now().Add(startTimeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
		_, err := c.PutObject(ctx, s.Bucket, probe, strings.NewReader("ready"), 5, minio.PutObjectOptions{})
		cancel()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("s3test: the server at %s takes no writes %s after start: %v\n%s", s.URL, startTimeout, err, s.logTail())
		}
		time.Sleep(100 * time.Millisecond)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := c.RemoveObject(ctx, s.Bucket, probe, minio.RemoveObjectOptions{}); err != nil {
		t.Fatalf("s3test: removing %s/%s: %v", s.Bucket, probe, err)
	}
}

// Put uploads the file at path as bucket/key.
func (s *Server) Put(t testing.TB, bucket, key, path string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := s.Client(t, s.Admin).FPutObject(ctx, bucket, key, path, minio.PutObjectOptions{}); err != nil {
		t.Fatalf("s3test: putting %s as s3://%s/%s: %v", path, bucket, key, err)
	}
}

// AddReader adds an identity that may read and list, with a new key pair,
// and waits until the server takes it. Tests that revoke a key add their
// own, and leave the server's other keys to the other tests.
func (s *Server) AddReader(t testing.TB, name string) Key {
	t.Helper()
	k := newKey(name)
	s.reconfigure(t, append(s.keys, k), k, true)
	return k
}

// Revoke removes k's identity from the server's configuration and waits
// until the server refuses k.
func (s *Server) Revoke(t testing.TB, k Key) {
	t.Helper()
	var kept []Key
	for _, x := range s.keys {
		if x.AccessKey != k.AccessKey {
			kept = append(kept, x)
		}
	}
	s.reconfigure(t, kept, k, false)
}

// reconfigure writes keys as the configuration, has the server reload it
// (SIGHUP), and waits until k is accepted or refused as wanted.
func (s *Server) reconfigure(t testing.TB, keys []Key, k Key, accepted bool) {
	t.Helper()
	s.keys = keys
	if err := s.writeConfig(); err != nil {
		t.Fatalf("s3test: %v", err)
	}
	if err := s.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatalf("s3test: asking weed to reload %s: %v", s.config, err)
	}
	c := s.Client(t, k)
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, err := c.BucketExists(ctx, s.Bucket)
		cancel()
		// SeaweedFS answers an unknown key with 403 AccessDenied.
		refused := minio.ToErrorResponse(err).StatusCode == http.StatusForbidden
		if accepted && err == nil || !accepted && refused {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("s3test: 30 s after the reload, the key of %s: %v (want accepted: %v)\n%s", k.Name, err, accepted, s.logTail())
		}
		select {
		case <-s.exited:
			t.Fatalf("s3test: weed exited on SIGHUP:\n%s", s.logTail())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Env points the AWS environment at the server, signing as k, and shields
// it from the machine's own AWS configuration: no shared files, profile,
// container or instance credentials.
func (s *Server) Env(t testing.TB, k Key) {
	t.Helper()
	Isolate(t)
	t.Setenv("AWS_ENDPOINT_URL_S3", s.URL)
	t.Setenv("AWS_REGION", s.Region)
	t.Setenv("AWS_ACCESS_KEY_ID", k.AccessKey)
	t.Setenv("AWS_SECRET_ACCESS_KEY", k.SecretKey)
}

// Isolate clears every AWS setting a test could inherit from the machine
// (the empty value counts as unset for each of them), and points the
// shared files at ones that do not exist.
func Isolate(t testing.TB) {
	t.Helper()
	for _, v := range []string{"AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
		"AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_SECRET_KEY", "AWS_SESSION_TOKEN",
		"AWS_PROFILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
		"AWS_CONTAINER_AUTHORIZATION_TOKEN", "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
		"AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN"} {
		t.Setenv(v, "")
	}
	none := filepath.Join(t.TempDir(), "none")
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", none)
	t.Setenv("AWS_CONFIG_FILE", none)
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
}

// writeConfig writes the identities in s.keys as weed's -s3.config.
func (s *Server) writeConfig() error {
	type cred struct {
		AccessKey string `json:"accessKey"`
		SecretKey string `json:"secretKey"`
	}
	type identity struct {
		Name        string   `json:"name"`
		Credentials []cred   `json:"credentials"`
		Actions     []string `json:"actions"`
	}
	var ids []identity
	for _, k := range s.keys {
		actions := []string{"Read", "List"}
		if k.AccessKey == s.Admin.AccessKey {
			actions = []string{"Admin", "Read", "Write", "List", "Tagging"}
		}
		ids = append(ids, identity{Name: k.Name, Credentials: []cred{{k.AccessKey, k.SecretKey}}, Actions: actions})
	}
	b, err := json.MarshalIndent(map[string]any{"identities": ids}, "", "  ")
	if err != nil {
		return err
	}
	// Written whole and renamed, so a reload never reads half a file.
	tmp := s.config + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, s.config)
}

// newKey makes an identity with a random key pair; each run's secrets are
// its own, so a test can look for them in what it is shown.
func newKey(name string) Key {
	b := make([]byte, 29)
	rand.Read(b)
	return Key{Name: name, AccessKey: "AK" + strings.ToUpper(hex.EncodeToString(b[:9])), SecretKey: hex.EncodeToString(b[9:])}
}

// freePorts returns n ports free on 127.0.0.1 a moment ago.
func freePorts(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("finding a free port: %w", err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// build runs tools/s3/build.sh into <repo>/build/s3 once per test binary,
// and waits for it while t's deadline allows. The script returns at once
// when the binary is there, and waits on a lock while another test binary
// builds it. A cold build takes minutes (about 5 on 2 idle cores, 9 on
// busy ones), which can outlast go test's default -timeout of 10 minutes:
// then t fails, saying so, and the build goes on by itself (its output goes
// to a file, not a pipe that dies with the test), so the next run finds it
// cached.
func build(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() { go runBuild() })
	var near <-chan time.Time
	if dt, ok := t.(interface{ Deadline() (time.Time, bool) }); ok {
		if d, ok := dt.Deadline(); ok {
			// Enough for the test to fail and clean up before the binary
			// is killed.
			timer := time.NewTimer(time.Until(d) - 30*time.Second)
			defer timer.Stop()
			near = timer.C
		}
	}
	select {
	case <-built:
	case <-near:
		t.Fatalf("s3test: SeaweedFS is still building (%s, output in %s) and the test's deadline is near; "+
			"the build goes on and is cached for the next run: run tools/s3/build.sh build/s3 before the tests, or give go test a longer -timeout",
			buildCmd, buildLog)
	}
	if buildErr != nil {
		t.Fatalf("s3test: %v", buildErr)
	}
	return weedPath
}

var (
	built              = make(chan struct{}) // closed when runBuild has ended
	buildCmd, buildLog string
)

func runBuild() {
	defer close(built)
	root, err := repoRoot()
	if err != nil {
		buildErr = err
		return
	}
	out := filepath.Join(root, "build", "s3")
	if err := os.MkdirAll(out, 0o755); err != nil {
		buildErr = err
		return
	}
	buildCmd = "tools/s3/build.sh " + out
	buildLog = filepath.Join(out, "build.log")
	// Appended to, not truncated: test binaries that start together each
	// run the script, and one of them writes the build's output.
	logf, err := os.OpenFile(buildLog, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		buildErr = err
		return
	}
	defer logf.Close()
	cmd := exec.Command(filepath.Join(root, "tools", "s3", "build.sh"), out)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Run(); err != nil {
		b, _ := os.ReadFile(buildLog)
		buildErr = fmt.Errorf("building SeaweedFS (%s) failed: %v; it needs Go and the module proxy (or a module cache holding github.com/seaweedfs/seaweedfs):\n%s",
			buildCmd, err, tail(string(b), 30))
		return
	}
	weedPath = filepath.Join(out, "weed")
}

// repoRoot is the directory of this module's go.mod, found from the test's
// working directory (its package's directory).
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for d := dir; ; d = filepath.Dir(d) {
		b, err := os.ReadFile(filepath.Join(d, "go.mod"))
		if err == nil && bytes.HasPrefix(b, []byte("module github.com/cloudletfs/cloudletfs\n")) {
			return d, nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("no go.mod of github.com/cloudletfs/cloudletfs above %s: run the tests inside the repository", dir)
		}
	}
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}
