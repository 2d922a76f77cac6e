// Package fetch brings an overlay's bytes to the cloudlet: sources (HTTP(S)
// with Range, S3 objects, local files), the streamer that pulls segments in overlay
// order, the demand scheduler that lets a waiting read jump ahead of it,
// retries, verification, and the chunk cache. It knows nothing of FUSE; the
// file system asks it for chunks.
package fetch

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/cloudletfs/cloudletfs/overlay"
)

// Source reads byte ranges of one overlay file.
type Source interface {
	// ReadRange returns exactly n bytes at off.
	ReadRange(ctx context.Context, off, n int64) ([]byte, error)
	// Size is the file's length, or -1 if not yet known.
	Size() int64
	String() string
	// Close releases the file or connections.
	Close() error
}

// ErrNoRange is returned by a server that answers a Range request with the
// whole file.
var ErrNoRange = errors.New("the server ignores Range requests; cloudletfs needs one that honours them (any static file server, CDN or S3-compatible store does)")

// Redact returns ref fit to show: a URL's password, and the signature and
// session token of a presigned URL, replaced by xxxxx. A URL that does not
// parse (a password with a slash, say) loses everything between its scheme
// and its last @.
func Redact(ref string) string {
	u, err := url.Parse(ref)
	if err == nil {
		if q, qerr := url.ParseQuery(u.RawQuery); qerr == nil {
			changed := false
			for k := range q {
				if signedParams[strings.ToLower(k)] {
					q[k] = []string{"xxxxx"}
					changed = true
				}
			}
			if changed {
				u.RawQuery = q.Encode()
				ref = u.String()
			}
		} else if u.RawQuery != "" {
			u.RawQuery = "xxxxx"
			ref = u.String()
		}
		if u.User != nil {
			return u.Redacted()
		}
		return ref
	}
	scheme, rest, ok := strings.Cut(ref, "://")
	if at := strings.LastIndex(rest, "@"); ok && at >= 0 {
		return scheme + "://xxxxx" + rest[at:]
	}
	return ref
}

// signedParams are the query parameters that make a presigned URL a
// credential: S3's (SigV4 and V2), and the signature and token of other
// stores' signed URLs.
var signedParams = map[string]bool{"x-amz-signature": true, "x-amz-security-token": true, "signature": true,
	"x-goog-signature": true, "sig": true}

// OpenSource returns the source for an http(s):// URL, an s3://bucket/key
// URL (S3Source), a file:// URL or a path. header is sent with every HTTP
// request (credentials, say); it never appears in errors or logs, and
// neither do credentials in the URL. An s3:// source takes its credentials
// from the environment instead, and refuses a header.
func OpenSource(ref string, client *http.Client, header http.Header) (Source, error) {
	u, err := url.Parse(ref)
	if err != nil && strings.Contains(ref, "://") {
		// The parser's message would repeat the URL, password and all.
		return nil, fmt.Errorf("overlay %s: not a valid URL (a password with / ? # or a space must be percent-encoded)", Redact(ref))
	}
	if err == nil && (u.Scheme == "http" || u.Scheme == "https") {
		if client == nil {
			client = DefaultClient(nil)
		}
		h := &HTTPSource{url: ref, shown: Redact(ref), client: client, header: header}
		h.size.Store(-1)
		return h, nil
	}
	if err == nil && u.Scheme == "s3" {
		return openS3(u, client, header)
	}
	path := ref
	if err == nil && u.Scheme == "file" {
		path = u.Path
	} else if err == nil && u.Scheme != "" && len(u.Scheme) > 1 {
		return nil, fmt.Errorf("overlay %s: unsupported scheme %q: use http://, https://, s3://, file:// or a path", Redact(ref), u.Scheme)
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("overlay: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("overlay %s: %w", path, err)
	}
	return &FileSource{f: f, size: st.Size()}, nil
}

// DefaultClient bounds connection set-up; each read's no-progress limit
// bounds waiting for headers and body. It speaks HTTP/2 where an https
// server offers it (one connection carries every request) and otherwise
// opens several connections per host, so a demand read never queues behind
// the stream's transfer. tlsConfig may add trusted roots.
func DefaultClient(tlsConfig *tls.Config) *http.Client {
	return &http.Client{Transport: &http.Transport{
		TLSClientConfig: tlsConfig,
		// A custom TLS config or dialer turns HTTP/2 off unless asked for.
		ForceAttemptHTTP2:     true,
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		TLSHandshakeTimeout:   5 * time.Second,
		ResponseHeaderTimeout: 15 * time.Second,
		MaxIdleConnsPerHost:   8,
		IdleConnTimeout:       60 * time.Second,
		// An HTTP/2 connection carries every request: one that goes
		// silent is found out by a ping and closed, so retries do not
		// queue on it.
		HTTP2: &http.HTTP2Config{SendPingTimeout: 10 * time.Second, PingTimeout: 5 * time.Second},
	}}
}

// Close drops idle connections.
func (h *HTTPSource) Close() error {
	h.client.CloseIdleConnections()
	return nil
}

// DefaultNoProgress is how long an HTTP response may stop arriving before
// the read is cut.
const DefaultNoProgress = 5 * time.Second

// HTTPSource reads ranges with HTTP Range requests.
type HTTPSource struct {
	url        string
	shown      string // the URL without credentials, for messages
	header     http.Header
	client     *http.Client
	size       atomic.Int64 // from Content-Range; -1 until the first response
	noProgress atomic.Int64 // a time.Duration
}

func (h *HTTPSource) String() string { return h.shown }

// Size returns the file length the server reported, or -1 before any read.
func (h *HTTPSource) Size() int64 { return h.size.Load() }

// SetNoProgress sets how long a response (its headers, then each part of
// its body) may keep the read waiting with no byte arriving; the read is
// then cut with ErrStalled, and the next one goes out on a new
// connection. Default DefaultNoProgress.
func (h *HTTPSource) SetNoProgress(d time.Duration) { h.noProgress.Store(int64(d)) }

// Errors a range read can fail with, besides those of the network.
var (
	// ErrStalled: the server stopped sending for longer than the
	// no-progress limit.
	ErrStalled = errors.New("no data arrived")
	// ErrWrongRange: the server answered with other bytes than asked for.
	ErrWrongRange = errors.New("the server answered with the wrong bytes")
	// ErrTruncated: the file ends before the range.
	ErrTruncated = errors.New("the overlay is truncated")
)

// HTTPError is a reply other than 206 (or 200) to a Range request.
type HTTPError struct {
	Status int
	// RetryAfter is the server's Retry-After, 0 if none.
	RetryAfter time.Duration
	msg        string
	// temporary marks a refusal that the next try mends whatever its
	// status: an S3 credential that expired, which that try fetches anew.
	temporary bool
}

func (e *HTTPError) Error() string { return e.msg }

// Temporary reports whether the same request may succeed later: 408, 429
// and 5xx. Any other 4xx will not pass by asking again soon, unless the
// source mends its cause before the next try (an S3 credential that
// expired).
func (e *HTTPError) Temporary() bool {
	return e.temporary || e.Status == http.StatusRequestTimeout || e.Status == http.StatusTooManyRequests || e.Status >= 500
}

// Permanent reports whether err, from a ReadRange, will not pass by asking
// again at once: the server ignores Range, answered with the wrong bytes,
// refused with a 4xx other than 408 and 429, or the file is too short.
func Permanent(err error) bool {
	var he *HTTPError
	if errors.As(err, &he) {
		return !he.Temporary()
	}
	return errors.Is(err, ErrNoRange) || errors.Is(err, ErrWrongRange) || errors.Is(err, ErrTruncated)
}

// retryAfter returns the Retry-After that err carries, 0 if none.
func retryAfter(err error) time.Duration {
	var he *HTTPError
	if errors.As(err, &he) {
		return he.RetryAfter
	}
	return 0
}

// errBodyLimit bounds how much of an error reply is read, so the connection
// can be used again, before it is closed.
const errBodyLimit = 64 << 10

// ReadRange fetches [off, off+n) and insists on a 206 whose Content-Range
// matches. No wait is unbounded: a response that stops arriving for the
// no-progress limit is cut.
func (h *HTTPSource) ReadRange(ctx context.Context, off, n int64) ([]byte, error) {
	// The stalled connection is closed with its request; idle ones to the
	// same server are suspect too, so the next try dials afresh.
	g := newStallGuard(ctx, time.Duration(h.noProgress.Load()), h.shown, off, n, h.client.CloseIdleConnections)
	defer g.stop()
	req, err := http.NewRequestWithContext(g.ctx, http.MethodGet, h.url, nil)
	if err != nil {
		return nil, err
	}
	for k, vs := range h.header {
		req.Header[k] = vs
	}
	req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", off, off+n-1))
	resp, err := h.client.Do(req)
	if err != nil {
		if err := g.stalled(err); errors.Is(err, ErrStalled) {
			return nil, err
		}
		// The error names the URL as given; name it without credentials.
		var ue *url.Error
		if errors.As(err, &ue) {
			return nil, fmt.Errorf("%s: %w", h.shown, ue.Err)
		}
		return nil, err
	}
	defer resp.Body.Close()
	g.progress()
	if resp.StatusCode != http.StatusPartialContent {
		if resp.StatusCode != http.StatusOK {
			// Read the short error reply so the connection is reused.
			io.Copy(io.Discard, io.LimitReader(resp.Body, errBodyLimit))
		}
		return nil, statusError(resp, off, n)
	}
	first, last, total, err := parseContentRange(resp.Header.Get("Content-Range"))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrWrongRange, err)
	}
	if first != off || last != off+n-1 {
		return nil, fmt.Errorf("%w: asked for bytes %d-%d, got %d-%d", ErrWrongRange, off, off+n-1, first, last)
	}
	if total >= 0 {
		h.size.Store(total)
	}
	return g.readBody(resp.Body, func(err error) error { return fmt.Errorf("reading bytes %d-%d: %w", off, off+n-1, err) })
}

// stallGuard cuts a range read whose response stops arriving for its
// limit: each byte that arrives puts the cut off again.
type stallGuard struct {
	caller, ctx context.Context // ctx is the caller's, cut on a stall
	cancel      context.CancelCauseFunc
	watch       *time.Timer
	limit       time.Duration
	shown       string
	off, n      int64
	onStall     func() // drops the connections a stall makes suspect
}

func newStallGuard(ctx context.Context, limit time.Duration, shown string, off, n int64, onStall func()) *stallGuard {
	if limit <= 0 {
		limit = DefaultNoProgress
	}
	g := &stallGuard{caller: ctx, limit: limit, shown: shown, off: off, n: n, onStall: onStall}
	g.ctx, g.cancel = context.WithCancelCause(ctx)
	g.watch = time.AfterFunc(limit, func() { g.cancel(ErrStalled) })
	return g
}

func (g *stallGuard) progress() { g.watch.Reset(g.limit) }

func (g *stallGuard) stop() {
	g.watch.Stop()
	g.cancel(nil)
}

// stalled returns err as ErrStalled when the guard, not the caller, cut
// the read, and err itself otherwise.
func (g *stallGuard) stalled(err error) error {
	if context.Cause(g.ctx) != ErrStalled || g.caller.Err() != nil {
		return err
	}
	g.onStall()
	return fmt.Errorf("%s: bytes %d-%d: %w for %s; the connection stalled", g.shown, g.off, g.off+g.n-1, ErrStalled, g.limit)
}

// readBody reads the n bytes of a range from body; wrap says what a
// failed read was.
func (g *stallGuard) readBody(body io.Reader, wrap func(error) error) ([]byte, error) {
	buf := make([]byte, g.n)
	for got := 0; got < len(buf); {
		m, err := body.Read(buf[got:])
		if m > 0 {
			got += m
			g.progress()
		}
		if err != nil && got < len(buf) {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return nil, g.stalled(wrap(err))
		}
	}
	return buf, nil
}

// statusError says what a reply other than 206 means and what to do.
func statusError(resp *http.Response, off, n int64) error {
	e := &HTTPError{Status: resp.StatusCode}
	switch resp.StatusCode {
	case http.StatusOK:
		return ErrNoRange
	case http.StatusUnauthorized:
		e.msg = fmt.Sprintf("HTTP %s: the server wants credentials (--header 'Authorization: Bearer ...')", resp.Status)
	case http.StatusForbidden:
		e.msg = fmt.Sprintf("HTTP %s: the server refused: either it wants credentials (--header 'Authorization: Bearer ...') "+
			"or the file's permissions on the server do not let it read the file (make it readable, e.g. chmod a+r)", resp.Status)
	case http.StatusNotFound:
		e.msg = fmt.Sprintf("HTTP %s: the server has no such file: check the URL", resp.Status)
	case http.StatusRequestedRangeNotSatisfiable:
		e.msg = fmt.Sprintf("HTTP %s: bytes %d-%d are beyond the end of the file: the overlay is truncated", resp.Status, off, off+n-1)
	default:
		e.msg = fmt.Sprintf("HTTP %s", resp.Status)
	}
	if v := resp.Header.Get("Retry-After"); v != "" {
		if s, err := strconv.Atoi(v); err == nil && s >= 0 {
			e.RetryAfter = time.Duration(s) * time.Second
		} else if t, err := http.ParseTime(v); err == nil {
			e.RetryAfter = max(time.Until(t), 0)
		}
		if e.RetryAfter > 0 {
			e.msg += fmt.Sprintf(" (retry after %s)", e.RetryAfter)
		}
	}
	return e
}

// parseContentRange parses "bytes FIRST-LAST/TOTAL"; TOTAL may be "*" (-1).
func parseContentRange(v string) (first, last, total int64, err error) {
	bad := fmt.Errorf("bad Content-Range %q", v)
	rest, ok := strings.CutPrefix(v, "bytes ")
	if !ok {
		return 0, 0, 0, bad
	}
	span, tot, ok := strings.Cut(rest, "/")
	if !ok {
		return 0, 0, 0, bad
	}
	a, b, ok := strings.Cut(span, "-")
	if !ok {
		return 0, 0, 0, bad
	}
	if first, err = strconv.ParseInt(a, 10, 64); err != nil || first < 0 {
		return 0, 0, 0, bad
	}
	if last, err = strconv.ParseInt(b, 10, 64); err != nil || last < first {
		return 0, 0, 0, bad
	}
	total = -1
	if tot != "*" {
		if total, err = strconv.ParseInt(tot, 10, 64); err != nil || total <= last {
			return 0, 0, 0, bad
		}
	}
	return first, last, total, nil
}

// FileSource reads a local overlay file.
type FileSource struct {
	f    *os.File
	size int64
}

func (s *FileSource) String() string { return s.f.Name() }

// Size returns the file's length.
func (s *FileSource) Size() int64 { return s.size }

// ReadRange reads [off, off+n) from the file.
func (s *FileSource) ReadRange(_ context.Context, off, n int64) ([]byte, error) {
	buf := make([]byte, n)
	if m, err := s.f.ReadAt(buf, off); m < len(buf) {
		if err == io.EOF || err == nil {
			return nil, fmt.Errorf("bytes %d-%d are beyond the end of the file: %w", off, off+n-1, ErrTruncated)
		}
		return nil, err
	}
	return buf, nil
}

// Close closes the file.
func (s *FileSource) Close() error { return s.f.Close() }

// OpenOverlay fetches and verifies an overlay's metadata (header, manifest,
// state, vm.json) with two reads: the header, then the rest of the
// metadata. A read that fails for a reason that may pass (a stall, a cut
// connection, a 5xx) is tried again, with backoff, until ctx ends.
func OpenOverlay(ctx context.Context, src Source) (*overlay.Overlay, error) {
	hb, err := readRetrying(ctx, src, 0, overlay.HeaderSize)
	if err != nil {
		return nil, fmt.Errorf("overlay %s: header: %w", src, err)
	}
	h, err := overlay.UnmarshalHeader(hb)
	if err != nil {
		return nil, fmt.Errorf("overlay %s: %w", src, err)
	}
	meta := hb
	if rest := h.MetadataLen() - overlay.HeaderSize; rest > 0 {
		b, err := readRetrying(ctx, src, overlay.HeaderSize, rest)
		if err != nil {
			return nil, fmt.Errorf("overlay %s: metadata: %w", src, err)
		}
		meta = append(hb, b...)
	}
	o, err := overlay.Open(bytes.NewReader(meta), src.Size())
	if err != nil {
		return nil, fmt.Errorf("overlay %s: %w", src, err)
	}
	return o, nil
}

// readRetrying reads a range, trying again after errors that may pass, with
// a delay doubling from 50 ms to 2 s (or the server's Retry-After), until
// ctx ends.
func readRetrying(ctx context.Context, src Source, off, n int64) ([]byte, error) {
	delay := 50 * time.Millisecond
	var prev error
	for tries := 1; ; tries++ {
		b, err := src.ReadRange(ctx, off, n)
		if err == nil {
			return b, nil
		}
		if ctx.Err() != nil {
			if prev != nil {
				// The try ctx cut says less than the one before it.
				err = prev
			}
			return nil, fmt.Errorf("gave up after %d tries: %w (last error: %v)", tries, ctx.Err(), err)
		}
		prev = err
		if Permanent(err) {
			return nil, err
		}
		t := time.NewTimer(max(delay, retryAfter(err)))
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("gave up after %d tries: %w (last error: %v)", tries, ctx.Err(), err)
		}
		delay = min(2*delay, 2*time.Second)
	}
}

// TLSConfig trusts the system roots plus the PEM certificates in caFile,
// if given.
func TLSConfig(caFile string) (*tls.Config, error) {
	if caFile == "" {
		return nil, nil
	}
	pool, err := x509.SystemCertPool()
	if err != nil {
		pool = x509.NewCertPool()
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("--ca-cert: %w", err)
	}
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("--ca-cert %s: no PEM certificate in it", caFile)
	}
	return &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}, nil
}

// ParseHeaders turns "Name: value" strings into a header.
func ParseHeaders(lines []string) (http.Header, error) {
	h := http.Header{}
	for _, l := range lines {
		k, v, ok := strings.Cut(l, ":")
		if !ok || strings.TrimSpace(k) == "" {
			// The line may hold a secret: do not echo it.
			return nil, fmt.Errorf("--header: want \"Name: value\", got a line without a name and a colon")
		}
		h.Add(strings.TrimSpace(k), strings.TrimSpace(v))
	}
	return h, nil
}
