package fetch

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
	"github.com/minio/minio-go/v7/pkg/s3utils"
)

// S3Source reads ranges of one object in an S3-compatible store (s3://bucket/key)
// with Range GETs that minio-go signs with SigV4. The endpoint, region and
// credentials come from the environment, as the AWS tools take them:
//
//   - endpoint: AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL, else AWS
//     (s3.amazonaws.com); an http:// endpoint is spoken to without TLS, and
//     any set endpoint is addressed path-style (http://host/bucket/key),
//     which every S3-compatible server understands;
//   - region: AWS_REGION, else AWS_DEFAULT_REGION, else us-east-1;
//   - credentials: the first of AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY
//     (with AWS_SESSION_TOKEN), the shared credentials and config files
//     (AWS_SHARED_CREDENTIALS_FILE, AWS_CONFIG_FILE, AWS_PROFILE,
//     ~/.aws/credentials), the container or instance credential endpoint
//     (AWS_CONTAINER_CREDENTIALS_FULL_URI or _RELATIVE_URI, a web identity
//     token, EC2's instance metadata unless AWS_EC2_METADATA_DISABLED=true);
//     unsigned requests if none has any.
//
// Credentials that expire are fetched again before they do (see
// s3Credentials). The secret key and session token never appear in an
// error, a log line or String.
type S3Source struct {
	bucket, key string
	shown       string // s3://bucket/key
	endpoint    string // as shown in messages
	region      string
	core        *minio.Core
	creds       *credentials.Credentials
	chain       *s3Credentials
	transport   http.RoundTripper
	size        atomic.Int64 // from Content-Range; -1 until the first response
	noProgress  atomic.Int64 // a time.Duration
}

// credTimeout bounds one retrieval of credentials from every source in
// turn, so a credential endpoint that hangs fails the read rather than
// holding it (and every read queued behind minio-go's credentials lock).
const credTimeout = 10 * time.Second

// credHelp says where credentials come from, for messages that ask for them.
const credHelp = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_SHARED_CREDENTIALS_FILE, AWS_PROFILE"

// openS3 makes the source for an s3:// URL. client's transport (its TLS
// roots, timeouts and connection pool) carries the requests.
func openS3(u *url.URL, client *http.Client, header http.Header) (*S3Source, error) {
	shown := "s3://" + u.Host + u.Path
	if u.User != nil {
		return nil, fmt.Errorf("overlay %s: credentials do not go in an s3:// URL: set %s", Redact(u.String()), credHelp)
	}
	if len(header) > 0 {
		return nil, fmt.Errorf("overlay %s: --header does not apply to s3://: requests are signed with the credentials from %s", shown, credHelp)
	}
	bucket, key := u.Host, strings.TrimPrefix(u.Path, "/")
	if err := s3utils.CheckValidBucketName(bucket); err != nil {
		return nil, fmt.Errorf("overlay %s: bucket %q: %v: use s3://bucket/key", shown, bucket, err)
	}
	if key == "" || strings.HasSuffix(key, "/") {
		return nil, fmt.Errorf("overlay %s: no object key: use s3://bucket/key", shown)
	}
	ep, err := s3Endpoint()
	if err != nil {
		return nil, fmt.Errorf("overlay %s: %w", shown, err)
	}
	region := os.Getenv("AWS_REGION")
	if region == "" {
		region = os.Getenv("AWS_DEFAULT_REGION")
	}
	if region == "" {
		region = "us-east-1"
	}
	var transport http.RoundTripper = http.DefaultTransport
	if client == nil {
		client = DefaultClient(nil)
	}
	if client.Transport != nil {
		transport = client.Transport
	}
	chain := newS3Credentials()
	creds := credentials.New(chain)
	lookup := minio.BucketLookupAuto
	if ep.custom {
		lookup = minio.BucketLookupPath
	}
	core, err := minio.NewCore(ep.host, &minio.Options{
		Creds:        creds,
		Secure:       ep.secure,
		Transport:    transport,
		Region:       region,
		BucketLookup: lookup,
		// The fetcher retries, with its own backoff and its view of the
		// stream; a second layer of retries would hide failures from it.
		MaxRetries: 1,
	})
	if err != nil {
		return nil, fmt.Errorf("overlay %s: endpoint %s: %w", shown, ep.shown, err)
	}
	s := &S3Source{bucket: bucket, key: key, shown: shown, endpoint: ep.shown, region: region,
		core: core, creds: creds, chain: chain, transport: transport}
	s.size.Store(-1)
	return s, nil
}

// endpoint is where S3 requests go.
type endpoint struct {
	host   string // host[:port]
	secure bool
	custom bool   // set by the environment rather than AWS's
	shown  string // the URL, and the variable it came from
}

// s3Endpoint reads the endpoint from the environment.
func s3Endpoint() (endpoint, error) {
	name, v := "AWS_ENDPOINT_URL_S3", os.Getenv("AWS_ENDPOINT_URL_S3")
	if v == "" {
		name, v = "AWS_ENDPOINT_URL", os.Getenv("AWS_ENDPOINT_URL")
	}
	if v == "" {
		return endpoint{host: "s3.amazonaws.com", secure: true, shown: "https://s3.amazonaws.com"}, nil
	}
	bad := fmt.Errorf("%s=%q: want http://host[:port] or https://host[:port]", name, Redact(v))
	u, err := url.Parse(v)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil ||
		(u.Path != "" && u.Path != "/") || u.RawQuery != "" {
		return endpoint{}, bad
	}
	return endpoint{host: u.Host, secure: u.Scheme == "https", custom: true,
		shown: fmt.Sprintf("%s://%s (%s)", u.Scheme, u.Host, name)}, nil
}

func (s *S3Source) String() string { return s.shown }

// Size returns the object's length the server reported, or -1 before any
// read.
func (s *S3Source) Size() int64 { return s.size.Load() }

// SetNoProgress sets how long a response (its headers, then each part of
// its body) may keep the read waiting with no byte arriving, as
// HTTPSource.SetNoProgress does. Default DefaultNoProgress.
func (s *S3Source) SetNoProgress(d time.Duration) { s.noProgress.Store(int64(d)) }

// Close drops idle connections.
func (s *S3Source) Close() error {
	s.closeIdle()
	return nil
}

func (s *S3Source) closeIdle() {
	if t, ok := s.transport.(interface{ CloseIdleConnections() }); ok {
		t.CloseIdleConnections()
	}
}

// ReadRange fetches [off, off+n) with a signed Range GET and insists on
// the bytes asked for. Credentials are made ready first, within
// credTimeout, so a slow credential endpoint is told from a stalled
// transfer; then, as for HTTPSource, a response that stops arriving for
// the no-progress limit is cut.
func (s *S3Source) ReadRange(ctx context.Context, off, n int64) ([]byte, error) {
	if err := s.credentials(ctx); err != nil {
		return nil, err
	}
	// The next try dials afresh, as HTTPSource's does.
	g := newStallGuard(ctx, time.Duration(s.noProgress.Load()), s.shown, off, n, s.closeIdle)
	defer g.stop()
	var opts minio.GetObjectOptions
	if err := opts.SetRange(off, off+n-1); err != nil {
		return nil, fmt.Errorf("%s: bytes %d-%d: %w", s.shown, off, off+n-1, err)
	}
	body, _, hdr, err := s.core.GetObject(g.ctx, s.bucket, s.key, opts)
	if err != nil {
		if err := g.stalled(err); errors.Is(err, ErrStalled) {
			return nil, err
		}
		return nil, s.failure(err, off, n)
	}
	defer body.Close()
	g.progress()
	cr := hdr.Get("Content-Range")
	if cr == "" {
		// A 200 with the whole object: the server ignored Range.
		return nil, fmt.Errorf("%s: %w", s.shown, ErrNoRange)
	}
	first, last, total, err := parseContentRange(cr)
	if err != nil {
		return nil, fmt.Errorf("%s: %w: %v", s.shown, ErrWrongRange, err)
	}
	if first == off && last < off+n-1 && total == last+1 {
		// S3 serves what there is of a range that runs past the end.
		return nil, fmt.Errorf("%s: bytes %d-%d are beyond the end of the object (%d bytes): %w", s.shown, off, off+n-1, total, ErrTruncated)
	}
	if first != off || last != off+n-1 {
		return nil, fmt.Errorf("%s: %w: asked for bytes %d-%d, got %d-%d", s.shown, ErrWrongRange, off, off+n-1, first, last)
	}
	if total >= 0 {
		s.size.Store(total)
	}
	return g.readBody(body, func(err error) error {
		return fmt.Errorf("%s: reading bytes %d-%d: %w", s.shown, off, off+n-1, s.scrubErr(err))
	})
}

// credentials makes sure minio-go holds credentials that have not expired,
// retrieving them within credTimeout if need be.
func (s *S3Source) credentials(ctx context.Context) error {
	if !s.creds.IsExpired() {
		return nil
	}
	cc := s.core.CredContext()
	cctx, cancel := context.WithTimeout(ctx, credTimeout)
	defer cancel()
	cc.Context = cctx
	if _, err := s.creds.GetWithContext(cc); err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return fmt.Errorf("%s: %w", s.shown, err)
	}
	return nil
}

// failure says what a failed GET means and what to do, as an *HTTPError
// when the server answered, so that Permanent and Retry-After work as for
// HTTPSource; network errors stay errors that may pass.
func (s *S3Source) failure(err error, off, n int64) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		// The URL is the endpoint's; name the object and endpoint instead.
		return fmt.Errorf("%s at %s: %w", s.shown, s.endpoint, s.scrubErr(ue.Err))
	}
	var er minio.ErrorResponse
	if !errors.As(err, &er) || er.StatusCode == 0 {
		return fmt.Errorf("%s at %s: %s", s.shown, s.endpoint, s.scrub(err.Error()))
	}
	status := fmt.Sprintf("%d %s", er.StatusCode, er.Code)
	if er.Code == "" {
		status = fmt.Sprintf("%d %s", er.StatusCode, http.StatusText(er.StatusCode))
	}
	e := &HTTPError{Status: er.StatusCode}
	switch {
	case er.Code == "ExpiredToken" || er.Code == "ExpiredTokenException" || er.Code == "TokenRefreshRequired":
		// The server's clock says the credentials expired before ours
		// did: fetch them again for the next try.
		s.creds.Expire()
		e.temporary = true
		e.msg = fmt.Sprintf("%s: the credentials expired (%s); new ones are fetched for the next try", s.shown, status)
	case er.StatusCode == http.StatusUnauthorized || er.StatusCode == http.StatusForbidden:
		if u := s.chain.inUse(); u == nil {
			e.msg = fmt.Sprintf("%s: access denied to an unsigned request (%s): no credentials were found; set %s, or make the object public", s.shown, status, credHelp)
		} else {
			e.msg = fmt.Sprintf("%s: access denied (%s) to the access key ending %s from %s: check the credentials (%s) and that they may read the object", s.shown, status, keyTail(u.accessKey), u.from, credHelp)
		}
	case er.Code == "NoSuchBucket":
		e.msg = fmt.Sprintf("%s: no such bucket %q at %s (%s): check the bucket name and the endpoint (AWS_ENDPOINT_URL_S3)", s.shown, s.bucket, s.endpoint, status)
	case er.StatusCode == http.StatusNotFound:
		e.msg = fmt.Sprintf("%s: no such object at %s (%s): check the key", s.shown, s.endpoint, status)
	case er.StatusCode == http.StatusRequestedRangeNotSatisfiable || er.Code == "InvalidRange":
		e.msg = fmt.Sprintf("%s: bytes %d-%d are beyond the end of the object (%s): the overlay is truncated", s.shown, off, off+n-1, status)
	case er.Region != "" && er.Region != s.region:
		e.msg = fmt.Sprintf("%s: the bucket is in region %s, not %s (%s): set AWS_REGION=%s", s.shown, er.Region, s.region, status, er.Region)
	case e.Temporary():
		e.msg = fmt.Sprintf("%s: the server at %s failed (%s)%s", s.shown, s.endpoint, status, says(er))
	default:
		e.msg = fmt.Sprintf("%s: the server at %s refused (%s)%s", s.shown, s.endpoint, status, says(er))
	}
	e.msg = s.scrub(e.msg)
	return e
}

// says quotes the server's message on an error that the codes above do not
// explain.
func says(er minio.ErrorResponse) string {
	if er.Message == "" {
		return ""
	}
	return ": the server says: " + er.Message
}

// scrub removes the secret key and session token from a message: a
// server or library may quote what it was sent.
func (s *S3Source) scrub(msg string) string {
	for _, secret := range s.chain.secrets() {
		if secret != "" {
			msg = strings.ReplaceAll(msg, secret, "xxxxx")
		}
	}
	return msg
}

func (s *S3Source) scrubErr(err error) error {
	if msg := s.scrub(err.Error()); msg != err.Error() {
		return errors.New(msg)
	}
	return err
}

// s3Credentials looks for credentials where the AWS tools do, through
// minio-go's providers: the environment, the shared credentials file, the
// container or instance endpoint (credentials.IAM). minio-go's own
// credentials.Chain would do the same, with two faults for a mount that
// lives for hours:
//
//   - When every provider fails it hands out anonymous credentials, so a
//     refresh that fails for a moment (the credential endpoint restarting)
//     sends unsigned requests, which the server refuses with 403, which
//     fails the fetch for good. Here, once credentials were found, not
//     finding them again is an error, and a read that gets it is retried.
//   - With no credentials anywhere it reports itself expired forever, and
//     every request probes the instance endpoint again. Here anonymous
//     access, once chosen, stays.
//
// Expiry is the providers' own: IAM credentials report themselves expired
// at 80% of their lifetime (minio-go's DefaultExpiryWindow), and so are
// fetched again before the server would refuse them; environment
// credentials never expire; the shared file is read again for every
// request, so a rotated file takes effect.
//
// credentials.Credentials wraps it and calls IsExpired and
// RetrieveWithCredContext under its mutex, one at a time; curr and found
// are only touched there. used is also read by error messages, from any
// goroutine.
type s3Credentials struct {
	providers []namedProvider
	curr      credentials.Provider // the provider of the credentials in use; nil if anonymous
	found     bool                 // some provider has given credentials
	used      atomic.Pointer[used] // nil while anonymous
}

// used describes the credentials in use, and keeps the secrets of these
// and of the ones before them, which a reply still in flight may quote.
type used struct {
	from, accessKey string
	secrets         [4]string // secret key, session token; the same before the last refresh
}

type namedProvider struct {
	name string
	credentials.Provider
}

func newS3Credentials() *s3Credentials {
	c := &s3Credentials{providers: []namedProvider{
		{"the environment (AWS_ACCESS_KEY_ID)", &credentials.EnvAWS{}},
		{"the shared credentials file", &credentials.FileAWSCredentials{}},
	}}
	// Off EC2, the instance endpoint costs a timeout to find missing;
	// AWS_EC2_METADATA_DISABLED=true skips it, as it does for the AWS CLI.
	// The container and web identity sources are asked regardless.
	if !strings.EqualFold(os.Getenv("AWS_EC2_METADATA_DISABLED"), "true") ||
		os.Getenv("AWS_CONTAINER_CREDENTIALS_FULL_URI") != "" || os.Getenv("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") != "" ||
		os.Getenv("AWS_WEB_IDENTITY_TOKEN_FILE") != "" {
		c.providers = append(c.providers, namedProvider{"the container or instance credential endpoint", &credentials.IAM{}})
	}
	return c
}

// RetrieveWithCredContext asks each provider in turn, within credTimeout.
func (c *s3Credentials) RetrieveWithCredContext(cc *credentials.CredContext) (credentials.Value, error) {
	bounded := credentials.CredContext{}
	if cc != nil {
		bounded = *cc
	}
	parent := bounded.Context
	if parent == nil {
		parent = context.Background()
	}
	ctx, cancel := context.WithTimeout(parent, credTimeout)
	defer cancel()
	bounded.Context = ctx
	var why []string
	for _, p := range c.providers {
		v, err := p.RetrieveWithCredContext(&bounded)
		if err == nil && v.AccessKeyID != "" && v.SecretAccessKey != "" {
			c.curr, c.found = p.Provider, true
			u := &used{from: p.name, accessKey: v.AccessKeyID, secrets: [4]string{v.SecretAccessKey, v.SessionToken}}
			if prev := c.used.Load(); prev != nil {
				u.secrets[2], u.secrets[3] = prev.secrets[0], prev.secrets[1]
			}
			c.used.Store(u)
			return v, nil
		}
		if err != nil {
			// Only the endpoint's errors are shown: a parse error of
			// the shared file could quote a line of it, secret and all.
			if _, ok := p.Provider.(*credentials.IAM); ok {
				why = append(why, fmt.Sprintf("%s: %v", p.name, err))
			}
		}
	}
	c.curr = nil
	if c.found {
		msg := "the credentials in use expired and none were found again (in " + credHelp + ", or a credential endpoint)"
		if len(why) > 0 {
			msg += ": " + strings.Join(why, "; ")
		}
		return credentials.Value{}, errors.New(msg)
	}
	return credentials.Value{SignerType: credentials.SignatureAnonymous}, nil
}

// Retrieve is RetrieveWithCredContext without a context.
func (c *s3Credentials) Retrieve() (credentials.Value, error) {
	return c.RetrieveWithCredContext(nil)
}

// IsExpired reports whether the credentials must be retrieved again.
func (c *s3Credentials) IsExpired() bool {
	if c.curr == nil {
		// Anonymous stays anonymous; credentials lost are looked for again.
		return c.found
	}
	return c.curr.IsExpired()
}

// inUse describes the credentials in use, nil if requests go unsigned.
func (c *s3Credentials) inUse() *used { return c.used.Load() }

// secrets returns the secret keys and session tokens to keep out of
// messages.
func (c *s3Credentials) secrets() []string {
	if u := c.used.Load(); u != nil {
		return u.secrets[:]
	}
	return nil
}

// keyTail is as much of an access key ID as a message shows: its last
// four characters, enough to tell which key was used, as the AWS console
// shows them.
func keyTail(id string) string {
	if len(id) <= 4 {
		return "…"
	}
	return "…" + id[len(id)-4:]
}
