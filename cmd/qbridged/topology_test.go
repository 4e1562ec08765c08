package main

import (
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

func TestRedisTopology(t *testing.T) {
	type want struct {
		kind     string // "single", "sentinel" or "cluster": the client NewUniversalClient makes
		addrs    []string
		db       int
		user     string
		pass     string
		master   string
		sentUser string
		sentPass string
		tls      bool
		check    func(t *testing.T, o *redis.UniversalOptions)
	}
	for _, tc := range []struct {
		url  string
		want want
	}{
		{"redis://127.0.0.1:6380/3", want{kind: "single", addrs: []string{"127.0.0.1:6380"}, db: 3}},
		{"redis://localhost", want{kind: "single", addrs: []string{"localhost:6379"}}},
		{"redis://u:p%40ss@h:1/2?dial_timeout=3s&pool_size=7", want{kind: "single", addrs: []string{"h:1"}, db: 2, user: "u", pass: "p@ss",
			check: func(t *testing.T, o *redis.UniversalOptions) {
				if o.DialTimeout != 3*time.Second || o.PoolSize != 7 {
					t.Errorf("dial timeout %v, pool size %d", o.DialTimeout, o.PoolSize)
				}
			}}},
		{"rediss://h:6390/0", want{kind: "single", addrs: []string{"h:6390"}, tls: true,
			check: func(t *testing.T, o *redis.UniversalOptions) {
				if o.TLSConfig.ServerName != "h" {
					t.Errorf("ServerName %q, want h", o.TLSConfig.ServerName)
				}
			}}},
		{"unix:///run/redis.sock?db=4", want{kind: "single", addrs: []string{"/run/redis.sock"}, db: 4}},
		{"unix://u:pw@/run/redis.sock", want{kind: "single", addrs: []string{"/run/redis.sock"}, user: "u", pass: "pw"}},
		{"REDIS://h:1", want{kind: "single", addrs: []string{"h:1"}}},

		{"redis-sentinel://s1:26380,s2,[::1]:26381/5?master=mymaster", want{kind: "sentinel",
			addrs: []string{"s1:26380", "s2:26379", "[::1]:26381"}, db: 5, master: "mymaster"}},
		{"redis-sentinel://qb:secret@127.0.0.1:1,127.0.0.1:2?master=qbridge&sentinel_username=su&sentinel_password=sp&read_timeout=2s",
			want{kind: "sentinel", addrs: []string{"127.0.0.1:1", "127.0.0.1:2"}, user: "qb", pass: "secret", master: "qbridge", sentUser: "su", sentPass: "sp",
				check: func(t *testing.T, o *redis.UniversalOptions) {
					if o.ReadTimeout != 2*time.Second {
						t.Errorf("read timeout %v", o.ReadTimeout)
					}
				}}},
		{"redis-sentinel://h?master_name=m", want{kind: "sentinel", addrs: []string{"h:26379"}, master: "m"}},
		{"rediss-sentinel://h1:1,h2:2/0?master=m&skip_verify=true", want{kind: "sentinel", addrs: []string{"h1:1", "h2:2"}, master: "m", tls: true,
			check: func(t *testing.T, o *redis.UniversalOptions) {
				if o.TLSConfig.ServerName != "" || !o.TLSConfig.InsecureSkipVerify {
					t.Errorf("ServerName %q (want none: each dial checks its host), skip verify %v", o.TLSConfig.ServerName, o.TLSConfig.InsecureSkipVerify)
				}
			}}},

		{"redis-cluster://n1:7000,n2:7001,n3", want{kind: "cluster", addrs: []string{"n1:7000", "n2:7001", "n3:6379"}}},
		{"redis-cluster://qb:pw@n1:7000", want{kind: "cluster", addrs: []string{"n1:7000"}, user: "qb", pass: "pw"}},
		{"redis-cluster://n1:7000/0", want{kind: "cluster", addrs: []string{"n1:7000"}}},
		{"redis-cluster://n1:7000/", want{kind: "cluster", addrs: []string{"n1:7000"}}},
		{"rediss-cluster://n1:7000,n2:7000?max_retries=2", want{kind: "cluster", addrs: []string{"n1:7000", "n2:7000"}, tls: true,
			check: func(t *testing.T, o *redis.UniversalOptions) {
				if o.MaxRetries != 2 {
					t.Errorf("max retries %d", o.MaxRetries)
				}
			}}},
	} {
		t.Run(tc.url, func(t *testing.T) {
			o, err := redisTopology(tc.url)
			if err != nil {
				t.Fatalf("redisTopology: %v", err)
			}
			w := tc.want
			if kind := topologyName(o); kind != w.kind {
				t.Errorf("topologyName %s, want %s", kind, w.kind)
			}
			if !reflect.DeepEqual(o.Addrs, w.addrs) {
				t.Errorf("addrs %q, want %q", o.Addrs, w.addrs)
			}
			if o.DB != w.db || o.Username != w.user || o.Password != w.pass || o.MasterName != w.master ||
				o.SentinelUsername != w.sentUser || o.SentinelPassword != w.sentPass {
				t.Errorf("db %d user %q pass %q master %q sentinel user %q pass %q; want %d %q %q %q %q %q",
					o.DB, o.Username, o.Password, o.MasterName, o.SentinelUsername, o.SentinelPassword,
					w.db, w.user, w.pass, w.master, w.sentUser, w.sentPass)
			}
			if (o.TLSConfig != nil) != w.tls {
				t.Errorf("TLS %v, want %v", o.TLSConfig != nil, w.tls)
			}
			if w.check != nil {
				w.check(t, o)
			}
			// The client NewUniversalClient makes is the one wanted.
			c := redis.NewUniversalClient(o)
			defer c.Close()
			var got string
			switch c.(type) {
			case *redis.ClusterClient:
				got = "cluster"
			case *redis.Client:
				got = "single"
				if w.kind == "sentinel" {
					got = "sentinel" // a FailoverClient is a *redis.Client
				}
			}
			if got != w.kind {
				t.Errorf("NewUniversalClient made %T, want a %s client", c, w.kind)
			}
		})
	}
}

func TestRedisTopologyErrors(t *testing.T) {
	const secret = "s3cr3t-pw"
	for _, tc := range []struct {
		url  string
		want string // in the error
	}{
		{"", "no scheme"},
		{"127.0.0.1:6379", "no scheme"},
		{"http://h:1", `unknown scheme "http"`},
		{"redis-sentinel://u:" + secret + "@h1:1,h2:2/0", "needs ?master=NAME"},
		{"redis-sentinel://u:" + secret + "@h1:1,h2:2/0?master=", "needs ?master=NAME"},
		{"redis-sentinel://u:" + secret + "@/0?master=m", "needs at least one host"},
		{"redis-sentinel://u:" + secret + "@h1:1,,h2:2?master=m", "host 2 of 3: empty"},
		{"redis-sentinel://u:" + secret + "@h1:1,?master=m", "host 2 of 2: empty"},
		{"redis-sentinel://u:" + secret + "@h1:99999?master=m", `port "99999"`},
		{"redis-sentinel://u:" + secret + "@h1:x?master=m", `port "x"`},
		{"redis-sentinel://u:" + secret + "@::1:5?master=m", "brackets"},
		{"redis-sentinel://u:" + secret + "@[::1:5?master=m", "unclosed ["},
		{"redis-sentinel://u:" + secret + "@[zz]:5?master=m", "not an IPv6 address"},
		{"redis-sentinel://u:" + secret + "@h1:1/x?master=m", "invalid database number"},
		{"redis-sentinel://u:" + secret + "@h1:1/0?master=m&bogus=1", "unexpected option: bogus"},
		{"redis-sentinel://u:" + secret + "@h1:1/0?master=m&sentinel_password=" + secret + "&bogus=1", "unexpected option: bogus"},
		{"redis-sentinel://u:" + secret + "@h1:1/0?master=m#frag", "fragment"},
		{"redis-cluster://u:" + secret + "@h1:1,h2:2/3", "Redis Cluster has only database 0"},
		{"redis-cluster://u:" + secret + "@h1:1?db=2", "Redis Cluster has only database 0"},
		{"redis-cluster://u:" + secret + "@h1:1?master=m", "takes no master option"},
		{"redis-cluster://u:" + secret + "@h1:1?sentinel_password=" + secret, "takes no sentinel_password option"},
		{"redis-cluster://u:" + secret + "%zz@h1:1", "invalid %-escape"},
		{"redis://u:" + secret + "%zz@h1:1", "invalid %-escape"},
		{"redis://u:" + secret + "@h1:1/a/b", "invalid URL path"},
		{"redis://u:" + secret + "@h1:1?pool_size=many", "pool_size"},
		{"unix://u:" + secret + "@", "empty unix socket path"},
	} {
		t.Run(tc.url, func(t *testing.T) {
			o, err := redisTopology(tc.url)
			if err == nil {
				t.Fatalf("redisTopology(%q) = %+v, want an error", tc.url, o)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not say %q", err, tc.want)
			}
			if strings.Contains(err.Error(), secret) {
				t.Errorf("error %q contains the password", err)
			}
		})
	}
}

func TestRedactRedisURL(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"redis://u:pw@h:1/0", "redis://u:xxxxx@h:1/0"},
		{"redis://h:1/0", "redis://h:1/0"},
		{"redis://u@h:1", "redis://u@h:1"},
		{"redis://u:p@w@h:1", "redis://u:xxxxx@h:1"},
		{"redis-sentinel://u:pw@[::1]:1,[::1]:2/0?master=m&sentinel_password=sp&read_timeout=1s",
			"redis-sentinel://u:xxxxx@[::1]:1,[::1]:2/0?master=m&sentinel_password=xxxxx&read_timeout=1s"},
		{"redis-cluster://u:pw@a:1,b:2?password=x#f", "redis-cluster://u:xxxxx@a:1,b:2?password=xxxxx#f"},
		{"unix://u:pw@/run/r.sock?db=1", "unix://u:xxxxx@/run/r.sock?db=1"},
		{"no scheme", "(unparsable URL)"},
	} {
		if got := redactRedisURL(tc.in); got != tc.want {
			t.Errorf("redactRedisURL(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}
