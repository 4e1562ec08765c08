package main

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// Redis topologies: --redis-url names a single node, a Sentinel-managed
// master or a Redis Cluster, and redisTopology turns it into options for
// redis.NewUniversalClient (which picks a Client, a sentinel-backed
// FailoverClient or a ClusterClient from them).
//
//	redis://[user:password@]host[:port][/db][?options]        one node (port 6379)
//	rediss://...                                               the same over TLS
//	unix://[user:password@]/path/to/redis.sock[?db=N&options]  one node, Unix socket
//	redis-sentinel://[user:password@]host[:port],host[:port].../[db]?master=NAME[&sentinel_username=U][&sentinel_password=P][&options]
//	                                                           the master NAME as the sentinels at
//	                                                           host:port (default port 26379) say
//	rediss-sentinel://...                                      the same, TLS to sentinels and data nodes
//	redis-cluster://[user:password@]host[:port],host[:port]...[?options]
//	                                                           a Redis Cluster, seeded by these nodes
//	                                                           (default port 6379); database 0 only
//	rediss-cluster://...                                       the same over TLS
//
// user and password are those of the data nodes (with Sentinel: of the
// master and replicas, not of the sentinels, whose credentials are
// sentinel_username and sentinel_password). options are go-redis's URL
// options (dial_timeout, read_timeout, pool_size, ..., skip_verify with
// TLS; see redis.ParseURL), for every node. Over TLS with several hosts,
// each connection checks the certificate against the host it dials.

// Topology URL schemes.
const (
	schemeSentinel    = "redis-sentinel"
	schemeSentinelTLS = "rediss-sentinel"
	schemeCluster     = "redis-cluster"
	schemeClusterTLS  = "rediss-cluster"

	defaultSentinelPort = "26379"
	defaultRedisPort    = "6379"
)

// topologyForms is what the errors of redisTopology offer instead.
const topologyForms = "want redis://host:port/db, rediss://..., unix:///path.sock?db=N, " +
	"redis-sentinel://host:port,host:port/db?master=NAME (or rediss-sentinel://) or " +
	"redis-cluster://host:port,host:port (or rediss-cluster://)"

// redisTopology parses a Redis URL (see above) into options for
// redis.NewUniversalClient. The options say which client it makes: a
// MasterName for Sentinel, IsClusterMode for Cluster, else one address.
// Errors name the problem and never contain a password (nor the URL).
func redisTopology(raw string) (*redis.UniversalOptions, error) {
	scheme, rest, ok := strings.Cut(raw, "://")
	if !ok || scheme == "" {
		return nil, fmt.Errorf("no scheme (%s)", topologyForms)
	}
	scheme = strings.ToLower(scheme)
	switch scheme {
	case "redis", "rediss", "unix":
		if err := checkURL(raw); err != nil {
			return nil, err
		}
		o, err := redis.ParseURL(raw)
		if err != nil {
			return nil, fmt.Errorf("%v (%s)", err, topologyForms)
		}
		return universal(o, []string{o.Addr}), nil
	case schemeSentinel, schemeSentinelTLS, schemeCluster, schemeClusterTLS:
		return multiHost(scheme, rest)
	}
	return nil, fmt.Errorf("unknown scheme %q (%s)", scheme, topologyForms)
}

// multiHost parses the part after "scheme://" of a Sentinel or Cluster URL.
func multiHost(scheme, rest string) (*redis.UniversalOptions, error) {
	sentinel := scheme == schemeSentinel || scheme == schemeSentinelTLS
	base, defPort := "redis", defaultRedisPort
	if strings.HasPrefix(scheme, "rediss") {
		base = "rediss"
	}
	if sentinel {
		defPort = defaultSentinelPort
	}

	authority, tail := rest, ""
	if i := strings.IndexAny(rest, "/?#"); i >= 0 {
		authority, tail = rest[:i], rest[i:]
	}
	userinfo, hostlist := "", authority
	if i := strings.LastIndex(authority, "@"); i >= 0 {
		userinfo, hostlist = authority[:i+1], authority[i+1:]
	}
	if hostlist == "" {
		return nil, fmt.Errorf("%s:// needs at least one host:port", scheme)
	}
	var addrs []string
	for i, h := range strings.Split(hostlist, ",") {
		addr, err := hostPort(h, defPort)
		if err != nil {
			return nil, fmt.Errorf("%s:// host %d of %d: %v", scheme, i+1, strings.Count(hostlist, ",")+1, err)
		}
		addrs = append(addrs, addr)
	}

	// The rest is a one-host URL of go-redis's own form.
	one := base + "://" + userinfo + addrs[0] + tail
	if err := checkURL(one); err != nil {
		return nil, err
	}
	u, _ := url.Parse(one)
	if u.Fragment != "" {
		return nil, fmt.Errorf("%s:// URL has a #fragment, which means nothing here", scheme)
	}
	q := u.Query()
	take := func(name string) (string, bool) {
		vs, ok := q[name]
		delete(q, name)
		if !ok || len(vs) == 0 {
			return "", ok
		}
		return vs[len(vs)-1], true
	}
	master, hasMaster := take("master")
	if alias, ok := take("master_name"); ok {
		master, hasMaster = alias, true
	}
	sentinelUser, hasSentinelUser := take("sentinel_username")
	sentinelPass, hasSentinelPass := take("sentinel_password")
	if sentinel {
		if master == "" {
			return nil, fmt.Errorf("%s:// needs ?master=NAME, the name the sentinels know the master by", scheme)
		}
	} else {
		for name, given := range map[string]bool{"master": hasMaster, "sentinel_username": hasSentinelUser, "sentinel_password": hasSentinelPass} {
			if given {
				return nil, fmt.Errorf("%s:// takes no %s option: it is for redis-sentinel:// URLs", scheme, name)
			}
		}
		if _, ok := q["db"]; ok {
			return nil, fmt.Errorf("%s:// takes no db option: Redis Cluster has only database 0", scheme)
		}
		if db := strings.Trim(u.Path, "/"); db != "" && db != "0" {
			return nil, fmt.Errorf("%s:// takes no database (/%s): Redis Cluster has only database 0", scheme, db)
		}
	}
	u.RawQuery = q.Encode()
	o, err := redis.ParseURL(u.String())
	if err != nil {
		return nil, fmt.Errorf("%s:// %v", scheme, err)
	}
	if o.TLSConfig != nil {
		// Several hosts: each connection checks the name it dials.
		o.TLSConfig.ServerName = ""
	}
	uo := universal(o, addrs)
	if sentinel {
		uo.MasterName = master
		uo.SentinelUsername, uo.SentinelPassword = sentinelUser, sentinelPass
	} else {
		uo.IsClusterMode = true
		uo.DB = 0
	}
	return uo, nil
}

// hostPort checks one host[:port] of a host list and adds the default
// port when there is none.
func hostPort(h, defPort string) (string, error) {
	if h == "" {
		return "", errors.New("empty (two commas in a row, or a comma at an end?)")
	}
	host, port := h, defPort
	if strings.HasPrefix(h, "[") {
		end := strings.Index(h, "]")
		if end < 0 {
			return "", fmt.Errorf("%q: unclosed [", h)
		}
		host = h[1:end]
		switch after := h[end+1:]; {
		case after == "":
		case strings.HasPrefix(after, ":"):
			port = after[1:]
		default:
			return "", fmt.Errorf("%q: unexpected %q after ]", h, after)
		}
		if net.ParseIP(host) == nil {
			return "", fmt.Errorf("%q: not an IPv6 address in brackets", h)
		}
	} else if i := strings.LastIndex(h, ":"); i >= 0 {
		host, port = h[:i], h[i+1:]
		if strings.Contains(host, ":") {
			return "", fmt.Errorf("%q: put an IPv6 address in brackets, [::1]:6379", h)
		}
	}
	if host == "" {
		return "", fmt.Errorf("%q: no host name", h)
	}
	if strings.ContainsAny(host, " \t/\\@?#%") {
		return "", fmt.Errorf("%q: not a host name", h)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return "", fmt.Errorf("%q: port %q is not a number from 1 to 65535", h, port)
	}
	return net.JoinHostPort(host, port), nil
}

// checkURL reports why raw is no valid URL, without repeating it (it may
// hold a password).
func checkURL(raw string) error {
	_, err := url.Parse(raw)
	if err == nil {
		return nil
	}
	// url.Error repeats the whole URL, password included: keep only the
	// reason.
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err
	}
	// An escape error quotes the bad escape, which may be in the password.
	var ee url.EscapeError
	if errors.As(err, &ee) {
		err = errors.New("it has an invalid %-escape")
	}
	return fmt.Errorf("not a valid URL: %v", err)
}

// universal carries over what redis.ParseURL read into universal options
// for the given addresses.
func universal(o *redis.Options, addrs []string) *redis.UniversalOptions {
	return &redis.UniversalOptions{
		Addrs:                   addrs,
		ClientName:              o.ClientName,
		DB:                      o.DB,
		Protocol:                o.Protocol,
		Username:                o.Username,
		Password:                o.Password,
		MaxRetries:              o.MaxRetries,
		MinRetryBackoff:         o.MinRetryBackoff,
		MaxRetryBackoff:         o.MaxRetryBackoff,
		DialTimeout:             o.DialTimeout,
		ReadTimeout:             o.ReadTimeout,
		WriteTimeout:            o.WriteTimeout,
		PoolFIFO:                o.PoolFIFO,
		PoolSize:                o.PoolSize,
		MaxConcurrentDials:      o.MaxConcurrentDials,
		PoolTimeout:             o.PoolTimeout,
		MinIdleConns:            o.MinIdleConns,
		MaxIdleConns:            o.MaxIdleConns,
		MaxActiveConns:          o.MaxActiveConns,
		ConnMaxIdleTime:         o.ConnMaxIdleTime,
		ConnMaxLifetime:         o.ConnMaxLifetime,
		ConnMaxLifetimeJitter:   o.ConnMaxLifetimeJitter,
		PipelinePoolSize:        o.PipelinePoolSize,
		PipelineReadBufferSize:  o.PipelineReadBufferSize,
		PipelineWriteBufferSize: o.PipelineWriteBufferSize,
		TLSConfig:               o.TLSConfig,
	}
}

// redactRedisURL returns raw with its passwords (of the data nodes and
// sentinel_password) replaced by "xxxxx", for logs and error messages. It
// handles every form redisTopology takes, host lists included.
func redactRedisURL(raw string) string {
	scheme, rest, ok := strings.Cut(raw, "://")
	if !ok {
		return "(unparsable URL)"
	}
	authority, tail := rest, ""
	if i := strings.IndexAny(rest, "/?#"); i >= 0 {
		authority, tail = rest[:i], rest[i:]
	}
	if i := strings.LastIndex(authority, "@"); i >= 0 {
		user, _, hasPass := strings.Cut(authority[:i], ":")
		if hasPass {
			authority = user + ":xxxxx" + authority[i:]
		}
	}
	path, query, hasQuery := strings.Cut(tail, "?")
	if hasQuery {
		query, frag, hasFrag := strings.Cut(query, "#")
		parts := strings.Split(query, "&")
		for i, p := range parts {
			name, _, _ := strings.Cut(p, "=")
			if n, err := url.QueryUnescape(name); err == nil && (n == "sentinel_password" || n == "password") {
				parts[i] = name + "=xxxxx"
			}
		}
		tail = path + "?" + strings.Join(parts, "&")
		if hasFrag {
			tail += "#" + frag
		}
	}
	return scheme + "://" + authority + tail
}

// topologyName names the kind of client redis.NewUniversalClient makes from
// o ("single", "sentinel" or "cluster"), for logs.
func topologyName(o *redis.UniversalOptions) string {
	switch {
	case o.MasterName != "":
		return "sentinel"
	case o.IsClusterMode || len(o.Addrs) > 1:
		return "cluster"
	}
	return "single"
}

// clusterReloadInterval is how often a Cluster client re-reads the slot map
// by itself. go-redis's default is 60 s, and a SIGKILLed master sends no
// MOVED: commands for its slots would go on failing with "connection
// refused" for up to a minute after a replica took over (measured: the
// queue of a killed master worked again ~5 s after the kill with 1 s, not
// before ~60 s with the default).
const clusterReloadInterval = time.Second

// newRedisClient is redis.NewUniversalClient, with a Cluster client that
// follows failovers within about a second of the promotion.
func newRedisClient(opts *redis.UniversalOptions) redis.UniversalClient {
	if opts.MasterName == "" && (opts.IsClusterMode || len(opts.Addrs) > 1) {
		co := opts.Cluster()
		co.ClusterStateReloadInterval = clusterReloadInterval
		return redis.NewClusterClient(co)
	}
	return redis.NewUniversalClient(opts)
}
