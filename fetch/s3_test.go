package fetch_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/cloudletfs/cloudletfs/fetch"
	"github.com/cloudletfs/cloudletfs/internal/s3test"
	"github.com/cloudletfs/cloudletfs/overlay"
)

// plainObject uploads size random bytes as s3://bucket/name.
func plainObject(t *testing.T, srv *s3test.Server, name string, size int) []byte {
	t.Helper()
	rng := rand.New(rand.NewPCG(uint64(size), 7))
	b := make([]byte, size)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	srv.Put(t, srv.Bucket, name, p)
	return b
}

func openS3(t *testing.T, ref string) *fetch.S3Source {
	t.Helper()
	src, err := fetch.OpenSource(ref, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	s3, ok := src.(*fetch.S3Source)
	if !ok {
		t.Fatalf("%s opened as %T", ref, src)
	}
	return s3
}

// noSecrets fails the test if any secret appears in what a user is shown.
func noSecrets(t *testing.T, shown string, secrets ...string) {
	t.Helper()
	for _, s := range secrets {
		if s != "" && strings.Contains(shown, s) {
			t.Errorf("a secret is shown: %q", shown)
		}
	}
}

// wants fails the test unless err's message holds every part.
func wants(t *testing.T, err error, parts ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("no error; want one saying %q", parts)
	}
	t.Logf("error: %v", err)
	for _, p := range parts {
		if !strings.Contains(err.Error(), p) {
			t.Errorf("error %q does not say %q", err, p)
		}
	}
}

// One server, many questions: the bytes of ranges, a whole overlay read
// through the fetcher, presigned URLs, and what each failure says.
func TestS3(t *testing.T) {
	srv := s3test.Start(t)
	const size = 3<<20 + 12345
	want := plainObject(t, srv, "plain", size)
	ref := "s3://" + srv.Bucket + "/plain"
	reader := srv.Readers[0]

	t.Run("ranges", func(t *testing.T) {
		srv.Env(t, reader)
		src := openS3(t, ref)
		if src.String() != ref || src.Size() != -1 {
			t.Fatalf("before a read: %q, size %d", src, src.Size())
		}
		for _, r := range [][2]int64{{0, 1}, {0, 4096}, {1 << 20, 1 << 20}, {size - 100, 100}, {12345, 2<<20 + 7}, {size - 1, 1}} {
			b, err := src.ReadRange(context.Background(), r[0], r[1])
			if err != nil {
				t.Fatalf("bytes %d+%d: %v", r[0], r[1], err)
			}
			if !bytes.Equal(b, want[r[0]:r[0]+r[1]]) {
				t.Fatalf("bytes %d+%d differ from the object's", r[0], r[1])
			}
		}
		if src.Size() != size {
			t.Errorf("size %d, want %d", src.Size(), size)
		}
		_, err := src.ReadRange(context.Background(), size-10, 20)
		if !fetch.Permanent(err) {
			t.Errorf("a read past the end is not permanent: %v", err)
		}
		wants(t, err, ref, "truncated")
	})

	t.Run("overlay", func(t *testing.T) {
		srv.Env(t, reader)
		r := newRig(t)
		srv.Put(t, srv.Bucket, "app.overlay", r.path)
		src := openS3(t, "s3://"+srv.Bucket+"/app.overlay")
		o, err := fetch.OpenOverlay(context.Background(), src)
		if err != nil {
			t.Fatal(err)
		}
		if o.ID != r.o.ID {
			t.Fatalf("overlay %x from S3, %x from the file", o.ID, r.o.ID)
		}
		f, err := fetch.New(src, o, r.base, r.cache, fetch.Options{Timeout: 30 * time.Second, Log: zerolog.Nop()})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(f.Close)
		// Every segment, fetched on demand, verified, decoded.
		for _, img := range []overlay.Image{overlay.Disk, overlay.Memory} {
			want := r.image(t, img)
			got := make([]byte, len(want))
			if err := f.ReadAt(context.Background(), img, got, 0); err != nil {
				t.Fatalf("image %d: %v", img, err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("image %d read through S3 differs from the extracted one", img)
			}
		}
		if st := f.Stats(); st.SegmentsPresent != st.Segments || st.BytesFetched == 0 || st.FetchErrors != 0 {
			t.Fatalf("stats after reading both images: %+v", st)
		}
	})

	t.Run("presigned", func(t *testing.T) {
		s3test.Isolate(t)
		c := srv.Client(t, reader)
		u, err := c.PresignedGetObject(context.Background(), srv.Bucket, "plain", 10*time.Minute, nil)
		if err != nil {
			t.Fatal(err)
		}
		src, err := fetch.OpenSource(u.String(), nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer src.Close()
		if _, ok := src.(*fetch.HTTPSource); !ok {
			t.Fatalf("a presigned URL opened as %T", src)
		}
		for _, r := range [][2]int64{{0, 4096}, {size - 5000, 5000}, {77777, 1 << 20}} {
			b, err := src.ReadRange(context.Background(), r[0], r[1])
			if err != nil {
				t.Fatalf("bytes %d+%d through %s: %v", r[0], r[1], src, err)
			}
			if !bytes.Equal(b, want[r[0]:r[0]+r[1]]) {
				t.Fatalf("bytes %d+%d differ from the object's", r[0], r[1])
			}
		}
		if src.Size() != size {
			t.Errorf("size %d, want %d", src.Size(), size)
		}
	})

	t.Run("shared credentials file", func(t *testing.T) {
		s3test.Isolate(t)
		t.Setenv("AWS_ENDPOINT_URL_S3", srv.URL)
		t.Setenv("AWS_REGION", srv.Region)
		k := srv.Readers[1]
		file := filepath.Join(t.TempDir(), "credentials")
		ini := fmt.Sprintf("[default]\naws_access_key_id = AKNOTTHISONE\naws_secret_access_key = nope\n\n[cloudlet]\naws_access_key_id = %s\naws_secret_access_key = %s\n", k.AccessKey, k.SecretKey)
		if err := os.WriteFile(file, []byte(ini), 0o600); err != nil {
			t.Fatal(err)
		}
		t.Setenv("AWS_SHARED_CREDENTIALS_FILE", file)
		t.Setenv("AWS_PROFILE", "cloudlet")
		b, err := openS3(t, ref).ReadRange(context.Background(), 100, 1000)
		if err != nil || !bytes.Equal(b, want[100:1100]) {
			t.Fatalf("with profile cloudlet of %s: %v", file, err)
		}
	})

	t.Run("wrong secret", func(t *testing.T) {
		bad := reader
		bad.SecretKey = "wrong" + reader.SecretKey[5:]
		srv.Env(t, bad)
		token := "session-token-" + reader.SecretKey[:12]
		t.Setenv("AWS_SESSION_TOKEN", token)
		src := openS3(t, ref)
		_, err := src.ReadRange(context.Background(), 0, 100)
		if !fetch.Permanent(err) {
			t.Errorf("refused credentials are not permanent: %v", err)
		}
		wants(t, err, ref, "access denied", "403", reader.AccessKey[len(reader.AccessKey)-4:], "AWS_ACCESS_KEY_ID", "AWS_SHARED_CREDENTIALS_FILE", "AWS_PROFILE")
		noSecrets(t, err.Error(), bad.SecretKey, token, reader.AccessKey)
		noSecrets(t, fmt.Sprintf("%s %+v %#v", src, err, err), bad.SecretKey, token)
	})

	t.Run("unknown key", func(t *testing.T) {
		srv.Env(t, s3test.Key{AccessKey: "AKNOSUCHKEY0000000", SecretKey: reader.SecretKey})
		_, err := openS3(t, ref).ReadRange(context.Background(), 0, 100)
		if !fetch.Permanent(err) {
			t.Errorf("an unknown key is not permanent: %v", err)
		}
		wants(t, err, ref, "access denied", "AWS_ACCESS_KEY_ID")
		noSecrets(t, err.Error(), reader.SecretKey)
	})

	t.Run("unsigned", func(t *testing.T) {
		srv.Env(t, s3test.Key{})
		_, err := openS3(t, ref).ReadRange(context.Background(), 0, 100)
		if !fetch.Permanent(err) {
			t.Errorf("an unsigned refusal is not permanent: %v", err)
		}
		wants(t, err, ref, "unsigned", "no credentials were found", "AWS_ACCESS_KEY_ID")
	})

	t.Run("missing object", func(t *testing.T) {
		srv.Env(t, reader)
		missing := "s3://" + srv.Bucket + "/no/such.overlay"
		_, err := openS3(t, missing).ReadRange(context.Background(), 0, 100)
		var he *fetch.HTTPError
		if !fetch.Permanent(err) || !errors.As(err, &he) || he.Status != http.StatusNotFound {
			t.Errorf("a missing object: not a permanent 404: %v", err)
		}
		wants(t, err, missing, "no such object", "check the key")
		_, err = fetch.OpenOverlay(context.Background(), openS3(t, missing))
		wants(t, err, missing, "no such object")
	})

	t.Run("missing bucket", func(t *testing.T) {
		srv.Env(t, srv.Admin)
		_, err := openS3(t, "s3://no-such-bucket/x").ReadRange(context.Background(), 0, 100)
		if !fetch.Permanent(err) {
			t.Errorf("a missing bucket is not permanent: %v", err)
		}
		wants(t, err, "s3://no-such-bucket/x", "no such bucket", "AWS_ENDPOINT_URL_S3")
	})

	t.Run("credential refresh", func(t *testing.T) { testCredentialRefresh(t, srv, ref, want) })

	t.Run("unreachable", func(t *testing.T) {
		srv.Env(t, reader)
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		dead := "http://" + l.Addr().String()
		l.Close()
		t.Setenv("AWS_ENDPOINT_URL_S3", dead)
		src := openS3(t, ref)
		_, err = src.ReadRange(context.Background(), 0, 100)
		if err == nil || fetch.Permanent(err) {
			t.Fatalf("an unreachable endpoint: %v; want an error that may pass", err)
		}
		wants(t, err, ref, dead, "AWS_ENDPOINT_URL_S3", "refused")
		// Such errors are retried, until the context ends.
		ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
		defer cancel()
		_, err = fetch.OpenOverlay(ctx, src)
		wants(t, err, "gave up after", "refused")
		noSecrets(t, err.Error(), reader.SecretKey)
	})
}

// fakeS3 is an S3 endpoint that answers every request with fn, for replies
// a real server will not give on demand.
func fakeS3(t *testing.T, fn http.HandlerFunc) string {
	srv := httptest.NewServer(fn)
	t.Cleanup(srv.Close)
	return srv.URL
}

// A response whose headers or body stop arriving is cut at the no-progress
// limit, as for HTTP, and may pass on a new try.
func TestS3Stalled(t *testing.T) {
	s3test.Isolate(t)
	t.Setenv("AWS_ACCESS_KEY_ID", "AKFAKE")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "fake-secret")
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	var calls sync.Map
	url := fakeS3(t, func(w http.ResponseWriter, r *http.Request) {
		n, _ := calls.LoadOrStore(r.URL.Path, new(int))
		*n.(*int)++
		if strings.HasSuffix(r.URL.Path, "/headers") {
			select {
			case <-release:
			case <-r.Context().Done():
			}
			return
		}
		w.Header().Set("Last-Modified", time.Now().UTC().Format(http.TimeFormat))
		w.Header().Set("Content-Range", "bytes 0-999/1000")
		w.Header().Set("Content-Length", "1000")
		w.WriteHeader(http.StatusPartialContent)
		w.Write(make([]byte, 300))
		w.(http.Flusher).Flush()
		select {
		case <-release:
		case <-r.Context().Done():
		}
	})
	t.Setenv("AWS_ENDPOINT_URL_S3", url)
	const limit = 300 * time.Millisecond
	for _, key := range []string{"headers", "body"} {
		src := openS3(t, "s3://bkt/"+key)
		src.SetNoProgress(limit)
		start := time.Now()
		_, err := src.ReadRange(context.Background(), 0, 1000)
		took := time.Since(start)
		if !errors.Is(err, fetch.ErrStalled) || fetch.Permanent(err) {
			t.Fatalf("%s that stall: %v; want ErrStalled, not permanent", key, err)
		}
		if took > 10*limit {
			t.Errorf("%s that stall: cut after %s; the limit is %s", key, took, limit)
		}
		wants(t, err, "s3://bkt/"+key)
	}
}

// credServer is a container credential endpoint
// (AWS_CONTAINER_CREDENTIALS_FULL_URI) whose answer the test sets.
type credServer struct {
	mu     sync.Mutex
	key    s3test.Key
	token  string
	expiry time.Time
	fail   bool
	asked  int
}

func (c *credServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.asked++
	if c.fail {
		http.Error(w, "down", http.StatusInternalServerError)
		return
	}
	json.NewEncoder(w).Encode(map[string]string{
		"AccessKeyId": c.key.AccessKey, "SecretAccessKey": c.key.SecretKey,
		"Token": c.token, "Expiration": c.expiry.UTC().Format(time.RFC3339Nano),
	})
}

func (c *credServer) set(k s3test.Key, token string, expiry time.Time, fail bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.key, c.token, c.expiry, c.fail = k, token, expiry, fail
}

func (c *credServer) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.asked
}

// Credentials from a container endpoint are fetched again when they
// expire, and the reads go on with the new ones: the endpoint hands out
// one reader's key with an expiry two seconds away; that key is then
// revoked on the server and the endpoint hands out the other reader's.
// A read after the expiry works only if it asked the endpoint again. Once
// credentials were found, an endpoint that fails does not turn the reads
// into unsigned ones that the server refuses for good: the read fails,
// may pass, and does once the endpoint is back.
func testCredentialRefresh(t *testing.T, srv *s3test.Server, ref string, want []byte) {
	s3test.Isolate(t)
	t.Setenv("AWS_ENDPOINT_URL_S3", srv.URL)
	t.Setenv("AWS_REGION", srv.Region)
	creds := &credServer{}
	cs := httptest.NewServer(creds)
	t.Cleanup(cs.Close)
	t.Setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", cs.URL+"/creds")

	first, second := srv.AddReader(t, "refresh1"), srv.AddReader(t, "refresh2")
	tokens := []string{"token-one-" + first.SecretKey[:10], "token-two-" + second.SecretKey[:10]}
	const lifetime = 2 * time.Second
	issued := time.Now()
	expiry := issued.Add(lifetime)
	creds.set(first, tokens[0], expiry, false)
	src := openS3(t, ref)
	read := func(what string) error {
		t.Helper()
		b, err := src.ReadRange(context.Background(), 1000, 5000)
		if err == nil && !bytes.Equal(b, want[1000:6000]) {
			t.Fatalf("%s: the bytes differ from the object's", what)
		}
		if err != nil {
			noSecrets(t, err.Error(), first.SecretKey, second.SecretKey, tokens[0], tokens[1])
		}
		return err
	}
	if err := read("first read"); err != nil {
		t.Fatal(err)
	}
	if n := creds.count(); n != 1 {
		t.Fatalf("the credential endpoint was asked %d times for the first read; want 1", n)
	}
	if err := read("second read"); err != nil {
		t.Fatal(err)
	}
	// Unexpired credentials are reused; minio-go counts them expired at
	// 80% of their lifetime, which a slow machine may have passed.
	if n := creds.count(); n != 1 && time.Since(issued) < lifetime*7/10 {
		t.Fatalf("the credential endpoint was asked %d times before the credentials expired; want 1", n)
	}

	creds.set(second, tokens[1], time.Now().Add(-time.Minute), false)
	srv.Revoke(t, first)
	// The credentials have expired once the clock passes their
	// expiration: no event to wait on but that instant.
	time.Sleep(time.Until(expiry))
	asked := creds.count()
	if err := read("a read after the first credentials expired"); err != nil {
		t.Fatalf("%v (the first credentials are revoked; the endpoint was asked %d times in all)", err, creds.count())
	}
	if creds.count() <= asked {
		t.Fatalf("the credential endpoint was not asked again after the credentials expired")
	}

	// The second credentials came expired already, so every read fetches
	// them again; now the endpoint fails.
	creds.set(second, tokens[1], time.Now().Add(-time.Minute), true)
	err := read("a read while the endpoint fails")
	if err == nil || fetch.Permanent(err) {
		t.Fatalf("a read while the credential endpoint fails: %v; want an error that may pass", err)
	}
	wants(t, err, ref, "credential endpoint", "500")
	creds.set(second, tokens[1], time.Now().Add(time.Hour), false)
	if err := read("a read once the endpoint is back"); err != nil {
		t.Fatal(err)
	}
}

// A server that says the credentials expired before the client thinks so
// (its clock runs ahead) has them fetched again for the next try, which
// succeeds; the first try's error may pass.
func TestS3ServerExpiredToken(t *testing.T) {
	s3test.Isolate(t)
	creds := &credServer{}
	cs := httptest.NewServer(creds)
	t.Cleanup(cs.Close)
	t.Setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", cs.URL+"/creds")
	creds.set(s3test.Key{AccessKey: "AKONE", SecretKey: "secret-one"}, "token-one", time.Now().Add(time.Hour), false)
	var mu sync.Mutex
	var keys []string
	url := fakeS3(t, func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		keys = append(keys, r.Header.Get("Authorization"))
		mu.Unlock()
		if strings.Contains(r.Header.Get("Authorization"), "AKONE/") {
			w.Header().Set("Content-Type", "application/xml")
			w.WriteHeader(http.StatusForbidden)
			fmt.Fprint(w, `<Error><Code>ExpiredToken</Code><Message>The provided token has expired.</Message></Error>`)
			return
		}
		w.Header().Set("Last-Modified", time.Now().UTC().Format(http.TimeFormat))
		w.Header().Set("Content-Range", "bytes 0-9/10")
		w.WriteHeader(http.StatusPartialContent)
		w.Write([]byte("0123456789"))
	})
	t.Setenv("AWS_ENDPOINT_URL_S3", url)
	src := openS3(t, "s3://bkt/k")
	_, err := src.ReadRange(context.Background(), 0, 10)
	if err == nil || fetch.Permanent(err) {
		t.Fatalf("ExpiredToken: %v; want an error that may pass", err)
	}
	wants(t, err, "s3://bkt/k", "expired")
	noSecrets(t, err.Error(), "secret-one", "token-one")
	creds.set(s3test.Key{AccessKey: "AKTWO", SecretKey: "secret-two"}, "token-two", time.Now().Add(time.Hour), false)
	b, err := src.ReadRange(context.Background(), 0, 10)
	if err != nil || string(b) != "0123456789" {
		t.Fatalf("the try after ExpiredToken: %q %v (endpoint asked %d times)", b, err, creds.count())
	}
	if n := creds.count(); n != 2 {
		t.Errorf("the credential endpoint was asked %d times; want 2", n)
	}
}

// Bad s3:// references and endpoints are refused at open, saying what to
// write instead.
func TestS3OpenRefused(t *testing.T) {
	s3test.Isolate(t)
	for ref, want := range map[string]string{
		"s3://bucket":                    "no object key",
		"s3://bucket/dir/":               "no object key",
		"s3://ab/key":                    "use s3://bucket/key",
		"s3://AKID:topsecret@bucket/key": "do not go in an s3:// URL",
		"ftp://host/x":                   "s3://",
	} {
		_, err := fetch.OpenSource(ref, nil, nil)
		wants(t, err, want)
		if err != nil {
			noSecrets(t, err.Error(), "topsecret")
		}
	}
	_, err := fetch.OpenSource("s3://bucket/key", nil, http.Header{"Authorization": {"Bearer x"}})
	wants(t, err, "--header does not apply")
	t.Setenv("AWS_ENDPOINT_URL", "localhost:9000")
	_, err = fetch.OpenSource("s3://bucket/key", nil, nil)
	wants(t, err, "AWS_ENDPOINT_URL=", "http://host[:port]")
}
